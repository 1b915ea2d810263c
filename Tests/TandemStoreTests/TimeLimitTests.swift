import CSQLite
import Foundation
import Testing
import TandemModel
@testable import TandemStore

/// `test_sleep(ms)`: sleeps, returns its argument. A statement that takes a known time
/// whatever the machine's speed (few VM steps, so SQLite's progress handler never runs
/// inside it).
private let sleepFunction: @convention(c) (OpaquePointer?, Int32, UnsafeMutablePointer<OpaquePointer?>?) -> Void = { context, _, values in
    let ms = values.map { sqlite3_value_int64($0[0]) } ?? 0
    usleep(UInt32(max(0, ms)) * 1000)
    sqlite3_result_int64(context, ms)
}

private func withSleep(_ store: StateStore) {
    _ = sqlite3_create_function_v2(store.db.handle, "test_sleep", 1, SQLITE_UTF8, nil, sleepFunction, nil, nil, nil)
}

private func storeWithTable(_ dir: String, _ limits: StoreLimits) throws -> StateStore {
    let store = try StateStore.create(directory: dir, clusterID: cluster, limits: limits)
    _ = try store.execute(WriteBatch([SQLStatement("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)")]), lsn: store.appliedLSN.next, term: Term(1))
    withSleep(store)
    return store
}

private func sleepingInsert(_ id: Int, ms: Int = 30) -> SQLStatement {
    SQLStatement("INSERT INTO t (id, v) VALUES (?, test_sleep(?))", [.integer(Int64(id)), .integer(Int64(ms))])
}

private func rows(_ store: StateStore) throws -> [[SQLValue]] {
    try store.db.rows("SELECT id FROM t ORDER BY id")
}

@Suite("Time limits on the site's loop")
struct TimeLimitTests {
    @Test("the time limit covers all of a write's statements together, and a write past it changes nothing")
    func oneLimitPerWrite() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        var limits = StoreLimits()
        limits.maxWriteNanoseconds = 50_000_000
        let store = try storeWithTable(dir.sub("s"), limits)
        let before = store.appliedLSN
        // Three statements of 30 ms: each alone is within 50 ms, together they are not.
        do {
            _ = try store.execute(WriteBatch([sleepingInsert(1), sleepingInsert(2), sleepingInsert(3)]), lsn: before.next, term: Term(1))
            Issue.record("a write of 90 ms passed a limit of 50 ms")
        } catch {
            #expect(error.code == "statement_timeout")
            #expect(error.description.contains("50 ms"), "\(error)")
        }
        #expect(store.appliedLSN == before)
        #expect(try rows(store).isEmpty, "nothing of the write was applied")
        // The same statements as three writes pass: the limit is per write.
        for id in 1...3 { _ = try store.execute(WriteBatch([sleepingInsert(id)]), lsn: store.appliedLSN.next, term: Term(1)) }
        #expect(try rows(store) == [[.integer(1)], [.integer(2)], [.integer(3)]])
    }

    @Test("a group of writes starts no further write past its time: the rest are left to the caller, and a write set aside still gets its answer")
    func groupStopsAtItsTime() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        var limits = StoreLimits()
        limits.maxGroupNanoseconds = 50_000_000
        let store = try storeWithTable(dir.sub("s"), limits)
        let first = store.appliedLSN.next
        let batches = (1...5).map { WriteBatch([sleepingInsert($0)]) }
        let results = store.execute(group: batches, from: first, term: Term(1))
        // The first always runs; the third would start at 60 ms at the earliest.
        #expect((1...2).contains(results.count), "\(results.count) of 5 writes ran in a group allowed 50 ms")
        #expect(results.allSatisfy { (try? $0.get()) != nil })
        #expect(store.appliedLSN == LSN(first.rawValue + UInt64(results.count) - 1))
        // The caller offers the rest again until all are done.
        var done = results.count
        while done < batches.count {
            let more = store.execute(group: Array(batches[done...]), from: store.appliedLSN.next, term: Term(1))
            #expect(!more.isEmpty)
            done += more.count
        }
        #expect(try rows(store).count == 5)

        // A write that rolls the whole transaction back is set aside and the group runs
        // again; past the time, the rerun still reaches it, so its answer is not lost.
        var roomy = StoreLimits()
        roomy.maxGroupNanoseconds = 200_000_000
        roomy.maxWriteNanoseconds = 0  // the 250 ms write must reach its conflict, however slow the machine
        let other = try storeWithTable(dir.sub("o"), roomy)
        _ = try other.execute(WriteBatch([SQLStatement("CREATE TABLE codes (id INTEGER PRIMARY KEY, code TEXT UNIQUE)")]), lsn: other.appliedLSN.next, term: Term(1))
        _ = try other.execute(WriteBatch([SQLStatement("INSERT INTO codes VALUES (1, 'A')")]), lsn: other.appliedLSN.next, term: Term(1))
        let again = other.execute(group: [
            WriteBatch([sleepingInsert(10, ms: 1)]),
            // Runs past the group's time, then rolls back the whole transaction.
            WriteBatch([sleepingInsert(11, ms: 250), SQLStatement("INSERT OR ROLLBACK INTO codes VALUES (2, 'A')")]),
            WriteBatch([sleepingInsert(12, ms: 1)]),
            WriteBatch([sleepingInsert(13, ms: 1)]),
        ], from: other.appliedLSN.next, term: Term(1))
        #expect(again.count == 2, "the rerun ends after the write set aside: \(again.count)")
        #expect((try? again.first?.get()) != nil)
        if again.count == 2, case let .failure(e) = again[1] { #expect(e.code == "constraint") } else { Issue.record("the write set aside has no failure") }
        #expect(try rows(other) == [[.integer(10)]])
    }

    @Test("committed schema records replay in full on a site whatever its limit, and so do configured migrations: only client writes and queries are interrupted")
    func replayIsNeverInterrupted() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try StateStore.create(directory: dir.sub("p"), clusterID: cluster)
        var instant = StoreLimits()
        instant.maxWriteNanoseconds = 1  // every client write or query is out of time at once
        let replica = try StateStore.create(directory: dir.sub("r"), clusterID: cluster, limits: instant)
        var records: [LogRecord] = []
        for sql in ["CREATE TABLE readings (id INTEGER PRIMARY KEY, v INTEGER)",
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) INSERT INTO readings SELECT x, x % 97 FROM c",
                    // Tens of thousands of VM steps: SQLite's progress handler runs inside it.
                    "CREATE INDEX readings_v ON readings (v)"] {
            records.append(try primary.execute(WriteBatch([SQLStatement(sql)]), lsn: primary.appliedLSN.next, term: Term(1)).record)
        }
        #expect(throws: StoreError.self) { _ = try replica.query(SQLStatement("SELECT 1")) }
        try replica.apply(records)
        #expect(replica.appliedLSN == primary.appliedLSN)
        #expect(try replica.stateHash() == primary.stateHash())
        #expect(try replica.db.rows("SELECT count(*) FROM sqlite_master WHERE name = 'readings_v'") == [[.integer(1)]])
        // A configured migration (schema version > 0) runs in full too; the same statement
        // sent by a client is interrupted.
        let index = SQLStatement("CREATE INDEX readings_id_v ON readings (id, v)")
        #expect(throws: StoreError.self) { _ = try replica.execute(WriteBatch([index]), lsn: replica.appliedLSN.next, term: Term(2)) }
        _ = try replica.execute(WriteBatch([index], schemaVersion: 2), lsn: replica.appliedLSN.next, term: Term(2))
        #expect(replica.schemaVersion == 2)
    }
}
