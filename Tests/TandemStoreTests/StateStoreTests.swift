import CSQLite
import Foundation
import Testing
import TandemModel
@testable import TandemStore

@Suite("State store")
struct StateStoreTests {
    @Test("the changeset, not the SQL, is replicated: non-deterministic expressions give the same rows everywhere")
    func changesetsReplicateValues() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("p"))
        let replica = try StateStore.create(directory: dir.sub("r"), clusterID: cluster)
        var records: [LogRecord] = []
        // The schema went through the log as schema records.
        records.append(contentsOf: try replayable(primary))
        records.append(try seedPeople(primary))
        let e = try primary.execute(WriteBatch([
            SQLStatement("INSERT INTO appointments (practitioner_id, patient_id, starts_at, duration_minutes, mode, booked_at_site) VALUES (1, 2, datetime('now', '+' || abs(random() % 1000) || ' minutes'), 30, 'phone', 'rbx')"),
            SQLStatement("UPDATE patients SET reference = reference || '-' || hex(randomblob(4)) WHERE id = 3"),
        ]), lsn: primary.appliedLSN.next, term: Term(1))
        #expect(e.record.kind == .changeset)
        #expect(e.results[0].rowsAffected == 1 && e.results[0].lastInsertRowID == 1)
        #expect(e.results[1].rowsAffected == 1)
        records.append(e.record)
        try replica.apply(records)
        #expect(replica.appliedLSN == primary.appliedLSN)
        #expect(replica.schemaVersion == TelehealthSchema.latestVersion)
        #expect(try replica.stateHash() == primary.stateHash())
        let q = try replica.query(SQLStatement("SELECT reference FROM patients WHERE id = 3"))
        #expect(q.rows == (try primary.query(SQLStatement("SELECT reference FROM patients WHERE id = 3"))).rows)
        #expect(q.appliedLSN == replica.appliedLSN)
    }

    @Test("the state hash read beside the store, on a connection of its own, is the store's, and sees only what SQLite committed")
    func stateHashBesideTheStore() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let store = try telehealthStore(dir.sub("p"))
        _ = try seedPeople(store)
        _ = try store.execute(booking(1), lsn: store.appliedLSN.next, term: Term(1))
        let beside = try StateStore.stateHash(ofFile: store.databaseFile)
        #expect(beside.lsn == store.appliedLSN)
        #expect(beside.hash == (try store.stateHash()))
        // The owner in the middle of a transaction (as its loop is while it applies): the
        // reader neither waits for it nor sees its rows.
        try store.db.exec("BEGIN IMMEDIATE")
        try store.db.exec("INSERT INTO patients (id, reference) VALUES (99, 'IPP-99')")
        try store.db.exec("UPDATE tandem_meta SET applied_lsn = applied_lsn + 1 WHERE id = 1")
        let during = try StateStore.stateHash(ofFile: store.databaseFile)
        #expect(during.lsn == beside.lsn && during.hash == beside.hash)
        try store.db.exec("ROLLBACK")
        // A change the store commits shows.
        _ = try store.execute(booking(2), lsn: store.appliedLSN.next, term: Term(1))
        let after = try StateStore.stateHash(ofFile: store.databaseFile)
        let own = try store.stateHash()
        #expect(after.lsn == store.appliedLSN && after.hash == own && after.hash != beside.hash)
        #expect(throws: StoreError.self) { _ = try StateStore.stateHash(ofFile: dir.sub("missing.db")) }
    }

    /// Re-creates, from the primary's schema migrations, the records it logged for them.
    func replayable(_ primary: StateStore) throws -> [LogRecord] {
        TelehealthSchema.migrations.enumerated().map { i, m in
            LogRecord(term: Term(1), lsn: LSN(UInt64(i + 1)), kind: .schema, payload: SchemaPayload.encode(m))
        }
    }

    @Test("schema statements become schema records; a table without a primary key is refused")
    func schemaRules() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let store = try StateStore.create(directory: dir.sub("p"), clusterID: cluster)
        let e = try store.execute(WriteBatch([SQLStatement("CREATE TABLE rooms (id INTEGER PRIMARY KEY, label TEXT)")]), lsn: LSN(1), term: Term(1))
        #expect(e.record.kind == .schema)
        for sql in ["CREATE TABLE audit (at TEXT, what TEXT)", "CREATE TABLE copy AS SELECT * FROM rooms"] {
            #expect(throws: StoreError.noPrimaryKey(table: sql.contains("audit") ? "audit" : "copy")) {
                _ = try store.execute(WriteBatch([SQLStatement(sql)]), lsn: LSN(2), term: Term(1))
            }
        }
        do {
            _ = try store.execute(WriteBatch([SQLStatement("CREATE TABLE a (id INTEGER PRIMARY KEY)"), SQLStatement("INSERT INTO rooms VALUES (1, 'x')")]),
                                  lsn: LSN(2), term: Term(1))
            Issue.record("a mixed batch was accepted")
        } catch {
            #expect(error.code == "refused")
            #expect(error.description.contains("batch of their own"))
        }
        #expect(store.appliedLSN == LSN(1))
        #expect(try store.query(SQLStatement("SELECT count(*) FROM sqlite_schema WHERE name IN ('audit', 'copy', 'a')")).rows == [[.integer(0)]])
    }

    @Test("what must not pass through SQL is refused with a reason, and nothing changes", arguments: [
        ("UPDATE tandem_meta SET applied_lsn = 99", "written by Tandem"),
        ("DELETE FROM tandem_undo", "written by Tandem"),
        ("DROP TABLE tandem_meta", "belong to Tandem"),
        ("CREATE INDEX x ON tandem_meta (applied_lsn)", "belong to Tandem"),
        ("BEGIN", "transaction control"),
        ("SAVEPOINT s", "transaction control"),
        ("PRAGMA foreign_keys = OFF", "PRAGMA"),
        ("ATTACH DATABASE '/tmp/x.db' AS x", "ATTACH"),
        ("CREATE TEMP TABLE t (id INTEGER PRIMARY KEY)", "temporary"),
        ("SELECT 1; DELETE FROM patients", "one SQL statement per entry"),
    ])
    func refusals(sql: String, reason: String) throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let store = try telehealthStore(dir.sub("p"))
        _ = try seedPeople(store)
        let before = try store.stateHash()
        let lsn = store.appliedLSN
        do {
            _ = try store.execute(WriteBatch([SQLStatement(sql)]), lsn: lsn.next, term: Term(1))
            Issue.record("\(sql) was accepted")
        } catch {
            #expect(error.code == "refused", "\(error)")
            #expect(error.description.contains(reason), "\(error)")
        }
        #expect(store.appliedLSN == lsn)
        #expect(try store.stateHash() == before)
        #expect(try store.query(SQLStatement("SELECT applied_lsn FROM tandem_meta")).rows == [[.integer(Int64(lsn.rawValue))]])
    }

    @Test("text after a statement may only be whitespace (ASCII or Unicode); anything else is a second statement")
    func trailingText() throws {
        for (text, blank) in [("", true), (" \n\t\r", true), ("\u{00A0}\u{2003}", true), (" ;", false), (" x", false), ("\u{00A0}x", false)] {
            #expect(text.withCString { StateStore.isBlank($0) } == blank, "\(text.debugDescription)")
        }
        let dir = TempDir(); defer { dir.cleanup() }
        let store = try telehealthStore(dir.sub("p"))
        _ = try seedPeople(store)
        _ = try store.execute(WriteBatch([SQLStatement("INSERT INTO patients (reference) VALUES ('P-TRAIL');  \n\t")]),
                              lsn: store.appliedLSN.next, term: Term(1))
        #expect(try store.query(SQLStatement("SELECT count(*) FROM patients WHERE reference = 'P-TRAIL'")).rows == [[.integer(1)]])
    }

    @Test("bad input fails with SQLite's message and a clear code; nothing is half-applied")
    func badInput() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        var limits = StoreLimits()
        limits.maxValueBytes = 1000
        limits.maxStatementBytes = 2000
        let store = try StateStore.create(directory: dir.sub("p"), clusterID: cluster, limits: limits)
        for m in TelehealthSchema.migrations { _ = try store.execute(m, lsn: store.appliedLSN.next, term: Term(1)) }
        _ = try seedPeople(store)
        let before = try store.stateHash()
        let lsn = store.appliedLSN
        let cases: [(WriteBatch, String, String)] = [
            (WriteBatch([SQLStatement("INSRT INTO patients VALUES (9, 'x')")]), "sql_error", "syntax error"),
            (WriteBatch([SQLStatement("INSERT INTO patients (id, reference) VALUES (9, 'IPP-9')"),
                         SQLStatement("INSERT INTO patients (id, reference) VALUES (10, 'IPP-1')")]), "constraint", "UNIQUE constraint failed"),
            (booking(1, practitioner: 77), "constraint", "FOREIGN KEY constraint failed"),
            (WriteBatch([SQLStatement("INSERT INTO patients (id, reference) VALUES (?, ?)", [.integer(9)])]), "sql_error", "2 parameters but 1"),
            (WriteBatch([SQLStatement("SELECT '" + String(repeating: "x", count: 2100) + "'")]), "too_large", "SQL"),
            (WriteBatch([SQLStatement("INSERT INTO patients (id, reference) VALUES (9, ?)", [.text(String(repeating: "y", count: 1001))])]), "too_large", "value"),
            (WriteBatch([SQLStatement("INSERT INTO patients (id, reference) VALUES (9, hex(zeroblob(2000)))")]), "too_large", "too big"),
            (WriteBatch([SQLStatement("SELECT * FROM no_such_table")]), "sql_error", "no such table"),
            (WriteBatch([]), "refused", "at least one statement"),
        ]
        for (batch, code, message) in cases {
            do {
                _ = try store.execute(batch, lsn: lsn.next, term: Term(1))
                Issue.record("accepted: \(batch)")
            } catch {
                #expect(error.code == code, "\(error)")
                #expect(error.description.contains(message), "\(error)")
            }
            #expect(store.appliedLSN == lsn)
        }
        #expect(try store.stateHash() == before)
        // The store still works.
        _ = try store.execute(booking(1), lsn: lsn.next, term: Term(1))
    }

    @Test("writes pipeline, and an uncommitted tail is undone in reverse order")
    func pipelineAndRollback() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("p"))
        let replica = try StateStore.create(directory: dir.sub("r"), clusterID: cluster)
        try replica.apply(try replayable(primary))
        var records = [try seedPeople(primary)]
        for i in 1...10 {
            records.append(try primary.execute(booking(i, patient: 1 + i % 3, at: "2021-03-10T\(10 + i):00:00Z"), lsn: primary.appliedLSN.next, term: Term(1)).record)
        }
        records.append(try primary.execute(WriteBatch([SQLStatement("UPDATE appointments SET status = 'cancelled' WHERE id <= 5"),
                                                       SQLStatement("DELETE FROM appointments WHERE id = 6")]),
                                           lsn: primary.appliedLSN.next, term: Term(1)).record)
        // Records through the 5th booking commit; the rest is a deposed primary's tail.
        let committed = records[5].lsn
        primary.markCommitted(through: committed)
        try replica.apply(Array(records[0...5]))
        #expect(try primary.undoDepth() == 6)
        try primary.rollback(to: committed)
        #expect(primary.appliedLSN == committed)
        #expect(try primary.stateHash() == replica.stateHash())
        #expect(throws: StoreError.self) { try primary.rollback(to: LSN(1)) }
    }

    @Test("two patients trading their UNIQUE references replicate and are undone (sqlite3changeset_apply stopped the replica on this)")
    func uniqueValuesTraded() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("p"))
        let replica = try StateStore.create(directory: dir.sub("r"), clusterID: cluster)
        try replica.apply(try replayable(primary))
        let people = try seedPeople(primary)
        try replica.apply([people])
        primary.markCommitted(through: people.lsn)
        let before = try primary.stateHash()
        // A reference entered on the wrong patient, corrected in one write: the changeset
        // holds two updates, neither of which can go first on its own.
        let swap = try primary.execute(WriteBatch([
            SQLStatement("UPDATE patients SET reference = 'swap' WHERE id = 1"),
            SQLStatement("UPDATE patients SET reference = 'IPP-1' WHERE id = 2"),
            SQLStatement("UPDATE patients SET reference = 'IPP-2' WHERE id = 1"),
        ]), lsn: primary.appliedLSN.next, term: Term(1)).record
        try replica.apply([swap])
        #expect(try replica.stateHash() == primary.stateHash())
        #expect(try replica.query(SQLStatement("SELECT reference FROM patients WHERE id = 1")).rows == [[.text("IPP-2")]])
        // Not committed: a deposed primary undoes it with the inverse, another cycle.
        try primary.rollback(to: people.lsn)
        #expect(try primary.stateHash() == before)
    }

    @Test("a group of writes runs in one transaction: one that fails takes no LSN, the others keep theirs, and each changeset stands alone")
    func groupedWrites() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("p"))
        let replica = try StateStore.create(directory: dir.sub("r"), clusterID: cluster)
        try replica.apply(try replayable(primary))
        var records = [try seedPeople(primary)]
        let committed = primary.appliedLSN
        primary.markCommitted(through: committed)
        let before = try primary.stateHash()
        let group: [WriteBatch] = [
            booking(1),
            booking(1, at: "2021-03-10T11:00:00Z"),  // the same id again: a constraint error
            WriteBatch([SQLStatement("UPDATE appointments SET status = 'cancelled' WHERE id = 1")]),  // the row written just before
            WriteBatch([SQLStatement("INSERT INTO nowhere VALUES (1)")]),  // no such table
            booking(2, patient: 2),
        ]
        let results = primary.execute(group: group, from: committed.next, term: Term(2))
        #expect(results.count == 5)
        let lsns = results.compactMap { try? $0.get().record.lsn }
        #expect(lsns == [committed.next, LSN(committed.rawValue + 2), LSN(committed.rawValue + 3)], "failed writes take no LSN")
        if case .failure(let e) = results[1] { #expect(e.code == "constraint", "\(e)") } else { Issue.record("the duplicate id was accepted") }
        if case .failure(let e) = results[3] { #expect(e.code == "sql_error", "\(e)") } else { Issue.record("the missing table was accepted") }
        #expect(primary.appliedLSN == LSN(committed.rawValue + 3))
        #expect(try primary.query(SQLStatement("SELECT id, status FROM appointments ORDER BY id")).rows
                == [[.integer(1), .text("cancelled")], [.integer(2), .text("booked")]])
        // Each record replays on its own, in order: the replica reaches the same state.
        records.append(contentsOf: results.compactMap { try? $0.get().record })
        try replica.apply(records)
        #expect(try replica.stateHash() == primary.stateHash())
        // And a deposed primary undoes the group's records like any others.
        try primary.rollback(to: committed)
        #expect(try primary.stateHash() == before)
        #expect(primary.appliedLSN == committed)
        #expect(primary.appliedTerm == Term(1), "the undo rows kept the term before the group")
    }

    @Test("kept (prepared) statements follow schema changes, and what was refused stays refused")
    func statementCache() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let store = try telehealthStore(dir.sub("p"))
        func write(_ sql: String, _ params: [SQLValue] = []) throws { _ = try store.execute(WriteBatch([SQLStatement(sql, params)]), lsn: store.appliedLSN.next, term: Term(1)) }
        try write("CREATE TABLE rooms (id INTEGER PRIMARY KEY, name TEXT)")
        let insert = "INSERT INTO rooms (id, name) VALUES (?, ?)"
        let select = SQLStatement("SELECT * FROM rooms ORDER BY id")
        try write(insert, [.integer(1), .text("a")])
        #expect(try store.query(select).columns == ["id", "name"])
        try write("ALTER TABLE rooms ADD COLUMN floor INTEGER")
        try write(insert, [.integer(2), .text("b")])
        #expect(try store.query(select).columns == ["id", "name", "floor"], "the kept query sees the new column")
        try write("DROP TABLE rooms")
        #expect(throws: StoreError.self) { try write(insert, [.integer(3), .text("c")]) }
        try write("CREATE TABLE rooms (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        try write(insert, [.integer(3), .text("c")])
        #expect(try store.query(select).rows == [[.integer(3), .text("c")]])
        // A write refused as a query is refused every time, even once kept as a write, and a
        // refused table stays refused.
        try write("DELETE FROM rooms WHERE id = 99")
        #expect(throws: StoreError.self) { _ = try store.query(SQLStatement("DELETE FROM rooms WHERE id = 99")) }
        for _ in 0..<2 {
            #expect(throws: StoreError.self) { _ = try store.query(SQLStatement("DELETE FROM rooms")) }
            #expect(throws: StoreError.self) { try write("UPDATE tandem_meta SET applied_lsn = 99") }
        }
        #expect(try store.query(select).rows.count == 1)
    }

    @Test("in a group, a write leaving a deferred foreign key unresolved fails on its own, and one whose failure rolls back the whole transaction is set aside")
    func groupIsolation() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("p"))
        let replica = try StateStore.create(directory: dir.sub("r"), clusterID: cluster)
        func write(_ sql: String) throws -> LogRecord {
            try primary.execute(WriteBatch([SQLStatement(sql)]), lsn: primary.appliedLSN.next, term: Term(1)).record
        }
        var records = try replayable(primary)
        records.append(try write("CREATE TABLE wards (id INTEGER PRIMARY KEY)"))
        records.append(try write("CREATE TABLE beds (id INTEGER PRIMARY KEY, ward INTEGER REFERENCES wards (id) DEFERRABLE INITIALLY DEFERRED)"))
        records.append(try write("CREATE TABLE codes (id INTEGER PRIMARY KEY, code TEXT UNIQUE)"))
        records.append(try write("INSERT INTO codes (id, code) VALUES (1, 'A')"))
        let first = primary.appliedLSN.next
        let results = primary.execute(group: [
            WriteBatch([SQLStatement("INSERT INTO beds (id, ward) VALUES (1, 7)")]),   // its ward comes only in the next write
            WriteBatch([SQLStatement("INSERT INTO wards (id) VALUES (7)")]),
            WriteBatch([SQLStatement("INSERT INTO codes (id, code) VALUES (2, 'B')")]),
            WriteBatch([SQLStatement("INSERT OR ROLLBACK INTO codes (id, code) VALUES (3, 'A')")]),  // rolls back the whole transaction
            WriteBatch([SQLStatement("INSERT INTO codes (id, code) VALUES (4, 'D')")]),
        ], from: first, term: Term(1))
        let outcome = results.map { r -> String in
            switch r {
            case .success: "ok"
            case let .failure(e): e.code
            }
        }
        #expect(outcome == ["constraint", "ok", "ok", "constraint", "ok"])
        #expect(results.compactMap { try? $0.get().record.lsn } == [first, first.next, first.next.next])
        #expect(try primary.query(SQLStatement("SELECT count(*) FROM beds")).rows == [[.integer(0)]])
        #expect(try primary.query(SQLStatement("SELECT group_concat(code) FROM (SELECT code FROM codes ORDER BY id)")).rows == [[.text("A,B,D")]])
        // Every record stands alone: a replica applying them one by one agrees.
        records.append(contentsOf: results.compactMap { try? $0.get().record })
        for r in records { try replica.apply([r]) }
        #expect(try replica.stateHash() == primary.stateHash())
    }

    @Test("a kept statement is the very bytes sent: canonically equivalent text is not taken for it")
    func statementCacheBytes() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let store = try telehealthStore(dir.sub("p"))
        _ = try store.execute(WriteBatch([SQLStatement("CREATE TABLE names (id INTEGER PRIMARY KEY, name TEXT)")]), lsn: store.appliedLSN.next, term: Term(1))
        let composed = "INSERT INTO names (id, name) VALUES (1, '\u{00E9}')"
        let decomposed = "INSERT INTO names (id, name) VALUES (1, 'e\u{0301}')"
        #expect(composed == decomposed, "Swift's String equality takes them for one text")
        _ = try store.execute(WriteBatch([SQLStatement(composed)]), lsn: store.appliedLSN.next, term: Term(1))
        _ = try store.execute(WriteBatch([SQLStatement("DELETE FROM names")]), lsn: store.appliedLSN.next, term: Term(1))
        _ = try store.execute(WriteBatch([SQLStatement(decomposed)]), lsn: store.appliedLSN.next, term: Term(1))
        #expect(try store.query(SQLStatement("SELECT hex(name) FROM names")).rows == [[.text("65CC81")]], "the decomposed bytes were stored")
    }

    @Test("a group whose writes all fail changes nothing and takes no LSN")
    func groupAllFail() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("p"))
        _ = try seedPeople(primary)
        let lsn = primary.appliedLSN
        let before = try primary.stateHash()
        let results = primary.execute(group: [WriteBatch([SQLStatement("INSERT INTO nowhere VALUES (1)")]),
                                              WriteBatch([SQLStatement("DELETE FROM tandem_undo")])], from: lsn.next, term: Term(1))
        #expect(results.allSatisfy { if case .failure = $0 { true } else { false } })
        #expect(primary.appliedLSN == lsn)
        #expect(try primary.stateHash() == before)
        _ = try primary.execute(booking(7), lsn: lsn.next, term: Term(1))
    }

    @Test("a schema change in the uncommitted tail asks for a rebuild")
    func schemaTailNeedsRebuild() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("p"))
        let lsn = primary.appliedLSN
        _ = try primary.execute(WriteBatch([SQLStatement("CREATE TABLE rooms (id INTEGER PRIMARY KEY)")]), lsn: lsn.next, term: Term(1))
        #expect {
            try primary.rollback(to: lsn)
        } throws: { ($0 as? StoreError)?.code == "needs_rebuild" }
    }

    @Test("a crash between applying a changeset and advancing the applied LSN changes nothing: both are one transaction")
    func crashBetweenChangesetAndLSN() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("p"))
        var replica: StateStore? = try StateStore.create(directory: dir.sub("r"), clusterID: cluster)
        try replica?.apply(try replayable(primary))
        let records = [try seedPeople(primary), try primary.execute(booking(1), lsn: primary.appliedLSN.next, term: Term(1)).record]
        let before = try replica!.stateHash()
        struct Crash: Error {}
        replica?.crashPointAfterChangeset = { lsn in if lsn == records[1].lsn { throw Crash() } }
        #expect(throws: StoreError.self) { try replica?.apply(records) }
        #expect(replica?.appliedLSN == LSN(1))
        #expect(try replica!.stateHash() == before)
        // The process "dies" and the database is opened again: same state, same LSN.
        replica = nil
        let reopened = try StateStore.open(directory: dir.sub("r"), clusterID: cluster)
        #expect(reopened.appliedLSN == LSN(1))
        #expect(try reopened.stateHash() == before)
        try reopened.apply(records)
        #expect(try reopened.stateHash() == primary.stateHash())
    }

    @Test("a changeset that does not match this site's rows is divergence, not silently applied")
    func divergence() throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("p"))
        let replica = try StateStore.create(directory: dir.sub("r"), clusterID: cluster)
        try replica.apply(try replayable(primary))
        _ = try seedPeople(primary)
        // The replica skips the seed record (as if a record were lost) and gets the next.
        let update = try primary.execute(WriteBatch([SQLStatement("UPDATE practitioners SET name = 'Dr Weber-Roth' WHERE id = 1")]),
                                         lsn: primary.appliedLSN.next, term: Term(1)).record
        var shifted = update
        shifted.lsn = LSN(2)
        #expect {
            try replica.apply([shifted])
        } throws: { ($0 as? StoreError)?.code == "divergence" }
        #expect(replica.appliedLSN == LSN(1))
    }
}

@Suite("SQLite authorizer")
struct AuthorizerTests {
    /// The C callback skips `decide` for actions outside `namedActions` (no strings made);
    /// an action `decide` looks at but the set misses would be allowed without a look.
    @Test("every action the authorizer decides on is in namedActions; every other one is allowed untouched in every mode")
    func namedActionsCoverDecide() {
        let names = ["tandem_meta", "tandem_undo", "table_info", "journal_mode", "main", "kv"]
        for mode: Authorizer.Mode in [.write, .read, .replay] {
            for action in Int32(0)...Int32(40) where !Authorizer.namedActions.contains(action) {
                for a3 in names {
                    for a4 in names {
                        let a = Authorizer()
                        a.begin(mode)
                        #expect(a.decide(action, a3, a4) == SQLITE_OK, "action \(action) in \(mode)")
                        #expect(a.denial == nil && !a.sawDDL && !a.sawPragma, "action \(action) in \(mode) was looked at")
                    }
                }
            }
        }
        // And the set is not vacuous: named actions are looked at.
        let a = Authorizer()
        a.begin(.write)
        #expect(a.decide(SQLITE_TRANSACTION, "BEGIN", nil) == SQLITE_DENY)
        #expect(a.decide(SQLITE_PRAGMA, "journal_mode", nil) == SQLITE_DENY)
    }
}
