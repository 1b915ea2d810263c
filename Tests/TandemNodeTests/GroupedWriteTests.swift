import Foundation
import Glibc
import Testing
import TandemCore
import TandemModel
import TandemStore
@testable import TandemNode

/// Counts the group sizes a runtime reports through `onProposal`.
final class ProposalSizes: @unchecked Sendable {
    let lock = NSLock()
    var sizes: [Int] = []
    func add(_ n: Int) { lock.withLock { sizes.append(n) } }
    var all: [Int] { lock.withLock { sizes } }
}

@Suite("Writes proposed in groups", .serialized)
struct GroupedWriteTests {
    @Test("concurrent writes are proposed in groups; a write that fails inside a group takes no LSN and leaves the others whole")
    func groupsWithFailures() async throws {
        let c = try TestCluster()
        defer { c.cleanup() }
        let sizes = ProposalSizes()
        c.configure = { $0.onProposal = { sizes.add($0) } }
        for id in c.ids { try c.start(id) }
        let p = try #require(c.primary())
        _ = try await p.write(WriteBatch([SQLStatement("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")]))
        _ = try await p.write(WriteBatch([SQLStatement("INSERT INTO kv (k, v) VALUES (-1, 'taken')")]))

        // 64 writers, 1,200 writes; every fifth reuses key -1 and must fail on the primary key.
        let next = Counter(0)
        let outcomes = try await withThrowingTaskGroup(of: [(Int, Result<LSN, WriteError>)].self) { group in
            for _ in 0..<64 {
                group.addTask {
                    var mine: [(Int, Result<LSN, WriteError>)] = []
                    while true {
                        let k = next.take()
                        if k >= 1_200 { return mine }
                        let key = k % 5 == 0 ? -1 : k
                        do throws(WriteError) {
                            let e = try await p.write(WriteBatch([SQLStatement("INSERT INTO kv (k, v) VALUES (?, ?)",
                                                                               [.integer(Int64(key)), .text("visit-\(k)")])]))
                            mine.append((k, .success(e.record.lsn)))
                        } catch {
                            mine.append((k, .failure(error)))
                        }
                    }
                }
            }
            var all: [(Int, Result<LSN, WriteError>)] = []
            for try await part in group { all += part }
            return all
        }
        #expect(outcomes.count == 1_200)
        var lsns: [LSN] = []
        for (k, outcome) in outcomes {
            switch outcome {
            case let .success(lsn):
                #expect(k % 5 != 0, "write \(k) reused key -1 and must have failed")
                lsns.append(lsn)
            case let .failure(error):
                #expect(k % 5 == 0, "write \(k) failed: \(error)")
                if case .store(.sqlite) = error {} else { Issue.record("write \(k) failed with \(error), not SQLite's constraint error") }
            }
        }
        #expect(lsns.count == 960)
        #expect(Set(lsns).count == lsns.count, "every acknowledged write has an LSN of its own")
        let grouped = sizes.all.filter { $0 > 1 }
        #expect(!grouped.isEmpty, "with 64 writers some writes were proposed together (sizes: \(sizes.all.prefix(40)))")

        #expect(c.waitConverged(timeout: 20))
        let rows = try await p.read(ReadRequest(statement: SQLStatement("SELECT count(*), sum(k) FROM kv"), consistency: .linearizable, deadline: SiteRuntime.now + 10_000_000_000))
        let expectedSum = (0..<1_200).filter { $0 % 5 != 0 }.reduce(0, +) - 1
        #expect(rows.rows.first == [.integer(961), .integer(Int64(expectedSum))], "each successful write once, no failed one")
        let hashes = try c.stopAllAndHash()
        #expect(Set(hashes.values.map(\.0)).count == 1, "every site holds the same state")
        #expect(Set(hashes.values.map(\.1)).count == 1)
    }

    @Test("bursts of runaway writes and queries are interrupted one at a time between heartbeats: the primary keeps its lease and no election starts")
    func runawayCallsKeepTheLease() async throws {
        let c = try TestCluster()
        // A long lease, so that the test does not hang on this machine's load, and short
        // call limits: 40 calls of 100 ms carried out back to back hold the loop 4 s.
        c.leaseMilliseconds = 3_000
        c.configure = {
            $0.storeLimits.maxWriteNanoseconds = 100_000_000
            $0.storeLimits.maxGroupNanoseconds = 20_000_000
        }
        defer { c.cleanup() }
        for id in c.ids { try c.start(id) }
        let p = try #require(c.primary())
        _ = try await p.write(WriteBatch([SQLStatement("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")]))
        let term = p.status.term
        // Watches the primary's lease while the bursts run.
        let watch = Task { () -> Int in
            var lapses = 0
            while !Task.isCancelled {
                if !p.status.holdsLease { lapses += 1 }
                try? await Task.sleep(nanoseconds: 10_000_000)
            }
            return lapses
        }
        // Each runs until it is interrupted.
        let endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)"
        let runawayWrite = WriteBatch([SQLStatement("INSERT INTO kv (k, v) \(endless) SELECT x, 'v' FROM c")])
        let runawayQuery = SQLStatement("\(endless) SELECT count(*) FROM c")
        let outcomes = await withTaskGroup(of: String.self) { group in
            for k in 0..<40 {
                group.addTask {
                    if k % 2 == 0 {
                        do throws(WriteError) { _ = try await p.write(runawayWrite); return "write passed" } catch {
                            if case .store(.statementTimedOut) = error { return "timed out" }
                            return "write: \(error)"
                        }
                    }
                    do {
                        _ = try await p.read(ReadRequest(statement: runawayQuery, consistency: .local, deadline: SiteRuntime.now + 10_000_000_000))
                        return "query passed"
                    } catch {
                        if case .store(.statementTimedOut) = error as? ReadError { return "timed out" }
                        return "query: \(error)"
                    }
                }
            }
            var all: [String] = []
            for await o in group { all.append(o) }
            return all
        }
        watch.cancel()
        let lapses = await watch.value
        #expect(outcomes == Array(repeating: "timed out", count: 40), "\(outcomes)")
        #expect(lapses == 0, "the primary's lease lapsed in \(lapses) looks, 10 ms apart")
        for (id, r) in c.runtimes { #expect(r.status.term == term, "\(id) moved to term \(r.status.term): an election started") }
        // And the site still writes.
        _ = try await p.write(WriteBatch([SQLStatement("INSERT INTO kv (k, v) VALUES (1, 'after')")]))
    }

    @Test("a log append queue too small for the load makes appends wait for room, in order; no write fails and no site stops")
    func fullLogQueueWaits() async throws {
        let c = try TestCluster()
        defer { c.cleanup() }
        // A queue of 32 KiB against groups of 8 KiB writes: appends find it full often.
        c.configure = {
            $0.walOptions.maxBatchBytes = 32 << 10
            $0.walOptions.maxQueuedBytes = 32 << 10
        }
        for id in c.ids { try c.start(id) }
        let p = try #require(c.primary())
        _ = try await p.write(WriteBatch([SQLStatement("CREATE TABLE blobs (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")]))
        let next = Counter(0)
        let failures = try await withThrowingTaskGroup(of: [String].self) { group in
            for _ in 0..<48 {
                group.addTask {
                    var mine: [String] = []
                    while true {
                        let k = next.take()
                        if k >= 600 { return mine }
                        do throws(WriteError) {
                            _ = try await p.write(WriteBatch([SQLStatement("INSERT INTO blobs (k, v) VALUES (?, randomblob(8192))",
                                                                           [.integer(Int64(k))])]))
                        } catch {
                            mine.append("write \(k): \(error)")
                        }
                    }
                }
            }
            var all: [String] = []
            for try await part in group { all += part }
            return all
        }
        #expect(failures.isEmpty, "\(failures.prefix(5))")
        #expect(c.waitConverged(timeout: 30))
        let hashes = try c.stopAllAndHash()
        #expect(hashes.count == 3)
        #expect(Set(hashes.values.map(\.0)).count == 1, "every site holds the same state")
    }
}
