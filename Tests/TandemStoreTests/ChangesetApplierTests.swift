import CSQLite
import Foundation
import Testing
import TandemModel
@testable import TandemStore

/// The store's changeset applier against `sqlite3changeset_apply` on replicas that have
/// diverged: wherever SQLite reports a conflict (and the store aborts), the applier
/// fails too, naming the table and why, and a rolled-back transaction leaves the replica
/// as it was. (That both end equal on random writes is checked with the capture's random
/// writes in ChangesetCaptureTests.)
@Suite("Changeset applier")
struct ChangesetApplierTests {
    /// The changeset of `sql` run on a fresh primary after `setup`.
    static func changeset(setup: String, _ sql: String, in dir: TempDir) throws -> [UInt8] {
        try captured(setup: setup, sql, in: dir).changeset
    }

    /// A fresh primary with `schema`, after `setup` and then `sql`, and the changeset `sql`
    /// made there.
    static func captured(schema: String = ChangesetCaptureTests.schema, setup: String, _ sql: String,
                         in dir: TempDir) throws -> (primary: SQLiteConnection, changeset: [UInt8]) {
        let db = try SQLiteConnection(path: dir.sub("primary-\(UUID().uuidString).sqlite"), create: true)
        try db.exec(schema)
        if !setup.isEmpty { try db.exec(setup) }
        let capture = ChangesetCapture(db: db)
        try db.exec("BEGIN")
        try capture.begin()
        try db.exec(sql)
        let changeset = try capture.finish().changeset
        try db.exec("COMMIT")
        return (db, changeset)
    }

    /// A replica with `state` (after the test schema, or `schema` instead).
    static func replica(_ state: String, schema: String = ChangesetCaptureTests.schema, in dir: TempDir) throws -> SQLiteConnection {
        let db = try SQLiteConnection(path: dir.sub("replica-\(UUID().uuidString).sqlite"), create: true)
        try db.exec(schema)
        if !state.isEmpty { try db.exec(state) }
        try db.exec("PRAGMA foreign_keys = OFF")
        return db
    }

    /// What sqlite3changeset_apply reports: its result code and the first conflict's kind.
    static func oracle(_ changeset: [UInt8], on db: SQLiteConnection) -> (rc: Int32, conflict: Int32) {
        var conflict: Int32 = 0
        let rc = changeset.withUnsafeBytes { cs in
            withUnsafeMutablePointer(to: &conflict) { box in
                sqlite3changeset_apply(db.handle, Int32(cs.count), UnsafeMutableRawPointer(mutating: cs.baseAddress), nil,
                                       { ctx, kind, _ in
                                           let seen = ctx?.assumingMemoryBound(to: Int32.self)
                                           if seen?.pointee == 0 { seen?.pointee = kind }
                                           return SQLITE_CHANGESET_ABORT
                                       }, box)
            }
        }
        return (rc, conflict)
    }

    /// Applies with the store's applier in a transaction that is rolled back on failure.
    static func ours(_ changeset: [UInt8], on db: SQLiteConnection) throws -> ChangesetApplier.Failure? {
        try db.exec("BEGIN")
        let applier = ChangesetApplier(db: db)
        do {
            try changeset.withUnsafeBytes { try applier.apply($0) }
            try db.exec("COMMIT")
            return nil
        } catch let failure as ChangesetApplier.Failure {
            try db.exec("ROLLBACK")
            return failure
        }
    }

    struct Case: CustomStringConvertible, Sendable {
        var name: String
        var primary: String
        var write: String
        var replica: String
        var replicaSchema: String? = nil
        var sqliteConflict: Int32
        var reason: String
        var description: String { name }
    }

    static let cases: [Case] = [
        Case(name: "insert of a row that exists", primary: "", write: "INSERT INTO t1 VALUES (1, 'a', 1.5, x'01')",
             replica: "INSERT INTO t1 VALUES (1, 'b', NULL, NULL)", sqliteConflict: SQLITE_CHANGESET_CONFLICT,
             reason: "already exists"),
        Case(name: "update of a row holding other values", primary: "INSERT INTO t1 VALUES (1, 'a', 1.5, x'01')",
             write: "UPDATE t1 SET name = 'z' WHERE id = 1",
             replica: "INSERT INTO t1 VALUES (1, 'other', 1.5, x'01')", sqliteConflict: SQLITE_CHANGESET_DATA,
             reason: "holds other values"),
        Case(name: "update of a missing row", primary: "INSERT INTO t2 VALUES ('k', 1, 0.5)",
             write: "UPDATE t2 SET n = 2 WHERE code = 'k'", replica: "", sqliteConflict: SQLITE_CHANGESET_NOTFOUND,
             reason: "does not exist"),
        Case(name: "delete of a row holding other values", primary: "INSERT INTO t3 VALUES ('a', 1, 'v')",
             write: "DELETE FROM t3", replica: "INSERT INTO t3 VALUES ('a', 1, 'w')", sqliteConflict: SQLITE_CHANGESET_DATA,
             reason: "holds other values"),
        Case(name: "delete of a missing row", primary: "INSERT INTO t4 VALUES ('a', 1, 'v')",
             write: "DELETE FROM t4", replica: "", sqliteConflict: SQLITE_CHANGESET_NOTFOUND, reason: "does not exist"),
        Case(name: "insert failing a constraint the replica has", primary: "",
             write: "INSERT INTO t2 VALUES ('k', 500, 0.5)", replica: "",
             replicaSchema: ChangesetCaptureTests.schema.replacingOccurrences(
                 of: "CREATE TABLE t2 (code TEXT PRIMARY KEY, n INTEGER, x REAL);",
                 with: "CREATE TABLE t2 (code TEXT PRIMARY KEY, n INTEGER CHECK (n < 100), x REAL);"),
             sqliteConflict: SQLITE_CHANGESET_CONSTRAINT, reason: "cannot be inserted"),
    ]

    @Test("where sqlite3changeset_apply meets a conflict, the applier fails with the table and the reason, and changes nothing",
          arguments: cases)
    func conflicts(_ c: Case) throws {
        let dir = TempDir("applier")
        defer { dir.cleanup() }
        // A first change that applies, so that a failure must also undo it.
        let changeset = try Self.changeset(setup: c.primary, "INSERT INTO parent VALUES (9, 'first'); " + c.write, in: dir)
        let reference = try Self.replica(c.replica, schema: c.replicaSchema ?? ChangesetCaptureTests.schema, in: dir)
        let seen = Self.oracle(changeset, on: reference)
        #expect(seen.rc == SQLITE_ABORT && seen.conflict == c.sqliteConflict, "SQLite itself: rc \(seen.rc), conflict \(seen.conflict)")

        let db = try Self.replica(c.replica, schema: c.replicaSchema ?? ChangesetCaptureTests.schema, in: dir)
        let before = try ChangesetCaptureTests.dump(db)
        let failure = try Self.ours(changeset, on: db)
        guard case let .conflict(table, reason) = failure else {
            Issue.record("expected a conflict, got \(String(describing: failure))")
            return
        }
        #expect(["t1", "t2", "t3", "t4"].contains(table))
        #expect(reason.contains(c.reason), "\(reason)")
        #expect(try ChangesetCaptureTests.dump(db) == before)
    }

    @Test("a table this site lacks, or whose columns or key differ, is a conflict (sqlite3changeset_apply reports none)")
    func schemaMismatch() throws {
        let dir = TempDir("applier-schema")
        defer { dir.cleanup() }
        let changeset = try Self.changeset(setup: "", "INSERT INTO t2 VALUES ('k', 1, 0.5)", in: dir)
        let withoutTable = ChangesetCaptureTests.schema.replacingOccurrences(of: "CREATE TABLE t2 (code TEXT PRIMARY KEY, n INTEGER, x REAL);", with: "")
        let otherColumns = ChangesetCaptureTests.schema.replacingOccurrences(
            of: "CREATE TABLE t2 (code TEXT PRIMARY KEY, n INTEGER, x REAL);",
            with: "CREATE TABLE t2 (code TEXT PRIMARY KEY, n INTEGER, x REAL, extra TEXT);")
        let otherKey = ChangesetCaptureTests.schema.replacingOccurrences(
            of: "CREATE TABLE t2 (code TEXT PRIMARY KEY, n INTEGER, x REAL);",
            with: "CREATE TABLE t2 (code TEXT, n INTEGER PRIMARY KEY, x REAL);")
        for (schema, why) in [(withoutTable, "no table t2"), (otherColumns, "differ"), (otherKey, "differ")] {
            let db = try Self.replica("", schema: schema, in: dir)
            #expect(Self.oracle(changeset, on: try Self.replica("", schema: schema, in: dir)).rc == SQLITE_OK,
                    "sqlite3changeset_apply reports no error (it skips the rows, or fills the missing column with its default)")
            let failure = try Self.ours(changeset, on: db)
            guard case let .conflict(table, reason) = failure else {
                Issue.record("expected a conflict, got \(String(describing: failure))")
                continue
            }
            #expect(table == "t2")
            #expect(reason.contains(why), "\(reason)")
        }
    }

    @Test("a cut, damaged or random changeset is an error or applies, never a crash; a schema change is seen")
    func malformedAndSchemaChanges() throws {
        let dir = TempDir("applier-malformed")
        defer { dir.cleanup() }
        let good = try Self.changeset(setup: "", "INSERT INTO t1 VALUES (1, 'a', 1.5, x'01'); INSERT INTO t2 VALUES ('k', 1, 0.5)", in: dir)
        let db = try Self.replica("", in: dir)
        for cut in 1..<good.count {
            _ = try Self.ours(Array(good.prefix(cut)), on: db)
            try db.exec("DELETE FROM t1; DELETE FROM t2")
        }
        #expect(try Self.ours(Array(good.prefix(good.count - 3)), on: db) != nil, "a changeset cut inside a value is refused")
        // The input that makes SQLite 3.40's own iterator spin: a lone table header byte.
        [UInt8(ascii: "T")].withUnsafeBytes { #expect(!ChangesetApplier.isWellFormed($0)) }
        good.withUnsafeBytes { #expect(ChangesetApplier.isWellFormed($0)) }
        var random = SeededRandom(seed: 7)
        for _ in 0..<500 {
            var damaged = good
            for _ in 0..<(1 + Int(random.next() % 4)) { damaged[Int(random.next() % UInt64(damaged.count))] = UInt8(random.next() % 256) }
            _ = try Self.ours(damaged, on: db)
            _ = try Self.ours((0..<Int(random.next() % 64)).map { _ in UInt8(random.next() % 256) }, on: db)
            try db.exec("DELETE FROM t1; DELETE FROM t2")
        }
        // Kept statements follow the schema: a column added between two applies.
        try db.exec("BEGIN")
        let applier = ChangesetApplier(db: db)
        try good.withUnsafeBytes { try applier.apply($0) }
        try db.exec("COMMIT; ALTER TABLE t1 ADD COLUMN extra TEXT")
        let wider = try Self.changeset(setup: "ALTER TABLE t1 ADD COLUMN extra TEXT", "INSERT INTO t1 VALUES (2, 'b', 2.5, x'02', 'e')", in: dir)
        try db.exec("BEGIN")
        try wider.withUnsafeBytes { try applier.apply($0) }
        try db.exec("COMMIT")
        #expect(try db.rows("SELECT extra FROM t1 WHERE id = 2") == [[.text("e")]])
    }

    @Test("a replica given a malformed changeset record refuses it as a bad record, alone, in a run or speculative, and stays where it was")
    func malformedRecordsInTheStore() throws {
        let dir = TempDir("applier-store")
        defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("primary"))
        let people = try seedPeople(primary)
        let booked = try primary.execute(booking(1), lsn: people.lsn.next, term: Term(1)).record
        for (index, how) in ["alone", "in a run", "speculative"].enumerated() {
            let replica = try telehealthStore(dir.sub("replica-\(index)"))
            // A lone table-header byte: SQLite 3.40's own readers never return on it. In a
            // run it comes second, after a good record that must be rolled back with it.
            let badLSN = how == "in a run" ? booked.lsn : people.lsn
            let bad = LogRecord(term: Term(1), lsn: badLSN, kind: .changeset, payload: [UInt8(ascii: "T")])
            let attempt: () throws(StoreError) -> Void = switch how {
            case "alone": { () throws(StoreError) in try replica.apply([bad]) }
            case "in a run": { () throws(StoreError) in try replica.apply([people, bad]) }
            default: { () throws(StoreError) in try replica.applySpeculatively([bad]) }
            }
            #expect(throws: StoreError.self, "\(how)") { try attempt() }
            do { try attempt() } catch {
                guard case let .badRecord(lsn, reason) = error else {
                    Issue.record("\(how): expected a bad record, got \(error)")
                    continue
                }
                #expect(lsn == badLSN && reason.contains("malformed"), "\(how): \(lsn) \(reason)")
            }
            #expect(replica.appliedLSN == people.lsn.previous, "\(how)")
            try replica.apply([people, booked])
            #expect(try replica.stateHash() == primary.stateHash(), "\(how)")
        }
    }

    static let uniqueSchema = """
        CREATE TABLE u (id INTEGER PRIMARY KEY, ref TEXT NOT NULL UNIQUE, n INTEGER);
        CREATE TABLE w (a TEXT, b INTEGER, tag INTEGER UNIQUE, PRIMARY KEY (a, b)) WITHOUT ROWID;
        CREATE TABLE r (k TEXT PRIMARY KEY, tag INTEGER UNIQUE);
        """

    static func dumpUnique(_ db: SQLiteConnection) throws -> [String] {
        try db.rows("SELECT * FROM u ORDER BY id").map { "u \($0)" } + db.rows("SELECT * FROM w ORDER BY a, b").map { "w \($0)" }
            + db.rows("SELECT * FROM r ORDER BY k").map { "r \($0)" }
    }

    /// A random write over tables whose UNIQUE values move between rows.
    static func uniqueWrite(_ r: inout SeededRandom) -> String {
        func ref() -> String { "'" + ["A", "B", "C", "D", "E"][Int(r.next() % 5)] + "'" }
        func id() -> UInt64 { r.next() % 5 }
        func tag() -> UInt64 { r.next() % 4 }
        return (0..<(1 + Int(r.next() % 4))).map { _ in
            switch r.next() % 11 {
            case 0: "INSERT OR IGNORE INTO u VALUES (\(id()), \(ref()), \(id()))"
            case 1, 2: "UPDATE OR IGNORE u SET ref = \(ref()) WHERE id = \(id())"
            case 3: "DELETE FROM u WHERE id = \(id())"
            case 4: "INSERT OR IGNORE INTO w VALUES (\(ref()), \(id() % 2), \(tag()))"
            case 5, 6: "UPDATE OR IGNORE w SET tag = \(tag()) WHERE a = \(ref())"
            case 7: "DELETE FROM w WHERE tag = \(tag())"
            // Two rows trade their UNIQUE values through a third: a cycle no order of
            // the changeset's updates can apply one by one.
            case 8: "UPDATE OR IGNORE u SET ref = 'tmp' WHERE id = \(id()); UPDATE OR IGNORE u SET ref = 'A' WHERE ref = 'B'; UPDATE OR IGNORE u SET ref = 'B' WHERE ref = 'tmp'"
            case 9: "INSERT OR IGNORE INTO r VALUES (\(ref()), \(tag()))"
            default: "UPDATE OR IGNORE r SET tag = -1 WHERE k = 'A'; UPDATE OR IGNORE r SET tag = \(tag()) WHERE k = 'B'; UPDATE OR IGNORE r SET tag = 7 WHERE tag = -1; DELETE FROM r WHERE tag = \(tag())"
            }
        }.joined(separator: "; ")
    }

    static func merged(_ changesets: [[UInt8]]) throws -> [UInt8] {
        var group: OpaquePointer?
        try #require(sqlite3changegroup_new(&group) == SQLITE_OK)
        defer { sqlite3changegroup_delete(group) }
        for c in changesets where !c.isEmpty {
            let rc = c.withUnsafeBytes { sqlite3changegroup_add(group, Int32($0.count), UnsafeMutableRawPointer(mutating: $0.baseAddress)) }
            try #require(rc == SQLITE_OK)
        }
        var n: Int32 = 0
        var p: UnsafeMutableRawPointer?
        try #require(sqlite3changegroup_output(group, &n, &p) == SQLITE_OK)
        defer { sqlite3_free(p) }
        return p.map { [UInt8](UnsafeRawBufferPointer(start: $0, count: Int(n))) } ?? []
    }

    @Test("UNIQUE values moving between rows: a change that fails a constraint waits for the table's other changes, as sqlite3changeset_apply does",
          arguments: [UInt64(1), 2, 3])
    func constraintsRetried(seed: UInt64) throws {
        let dir = TempDir("applier-unique")
        defer { dir.cleanup() }
        func open(_ name: String) throws -> SQLiteConnection {
            let db = try SQLiteConnection(path: dir.sub(name), create: true)
            try db.exec(Self.uniqueSchema)
            return db
        }
        let primary = try open("primary.sqlite")
        // Each write alone (with its undo and redo now and then), and groups of writes
        // merged with a changegroup: SQLite's apply and the store's, side by side.
        let oracle = try open("oracle.sqlite"), ours = try open("ours.sqlite")
        let oracleMerged = try open("oracle-merged.sqlite"), oursMerged = try open("ours-merged.sqlite")
        let applier = ChangesetApplier(db: ours), mergedApplier = ChangesetApplier(db: oursMerged)
        let capture = ChangesetCapture(db: primary)
        var random = SeededRandom(seed: seed)
        var pending: [[UInt8]] = []
        var cycles = 0
        /// Where SQLite's function cannot apply a changeset (a cycle), its replica sits out
        /// the rest of the step and is then set to the primary's state again.
        var oracleOut: Set<ObjectIdentifier> = []
        func both(_ changeset: [UInt8], _ a: SQLiteConnection, _ b: SQLiteConnection, _ applier: ChangesetApplier) throws {
            guard !changeset.isEmpty else { return }
            if !oracleOut.contains(ObjectIdentifier(a)) {
                try a.exec("BEGIN")
                let seen = Self.oracle(changeset, on: a)
                try a.exec(seen.rc == SQLITE_OK ? "COMMIT" : "ROLLBACK")
                if seen.rc != SQLITE_OK {
                    #expect(seen.conflict == SQLITE_CHANGESET_CONSTRAINT, "SQLite: rc \(seen.rc), conflict \(seen.conflict)")
                    cycles += 1
                    oracleOut.insert(ObjectIdentifier(a))
                }
            }
            try b.exec("BEGIN")
            try changeset.withUnsafeBytes { try applier.apply($0) }
            try b.exec("COMMIT")
        }
        func resync() throws {
            for a in [oracle, oracleMerged] where oracleOut.contains(ObjectIdentifier(a)) {
                try a.exec("ATTACH '\(dir.sub("primary.sqlite"))' AS p; DELETE FROM u; DELETE FROM w; DELETE FROM r; INSERT INTO u SELECT * FROM p.u; INSERT INTO w SELECT * FROM p.w; INSERT INTO r (rowid, k, tag) SELECT rowid, k, tag FROM p.r; DETACH p")
            }
            oracleOut.removeAll()
        }
        for step in 0..<400 {
            let sql = Self.uniqueWrite(&random)
            try primary.exec("BEGIN")
            try capture.begin()
            do { try primary.exec(sql) } catch {
                capture.discard()
                try primary.exec("ROLLBACK")
                continue
            }
            let captured = try capture.finish()
            try primary.exec("COMMIT")
            try both(captured.changeset, oracle, ours, applier)
            if step % 4 == 0 {
                try both(captured.inverse, oracle, ours, applier)
                try both(captured.changeset, oracle, ours, applier)
            }
            let expected = try Self.dumpUnique(primary)
            if pending.count == 7 {
                try both(try Self.merged(pending + [captured.changeset]), oracleMerged, oursMerged, mergedApplier)
                pending.removeAll()
                #expect(try Self.dumpUnique(oursMerged) == expected)
            } else {
                pending.append(captured.changeset)
            }
            try resync()
            if pending.isEmpty { #expect(try Self.dumpUnique(oracleMerged) == expected) }
            #expect(try Self.dumpUnique(oracle) == expected, "SQLite's apply after \(sql)")
            #expect(try Self.dumpUnique(ours) == expected, "the store's apply after \(sql)")
            if try Self.dumpUnique(ours) != expected { return }
        }
        // The random writes did need the retries, alone and merged, and met cycles.
        // Retries that then succeeded in order, and cycles replaced.
        #expect(applier.retriedChanges > applier.replacedChanges + 10)
        #expect(applier.replacedChanges > 3)
        #expect(mergedApplier.retriedChanges > 0)
        #expect(cycles > 3)
    }

    @Test("a UNIQUE value held by a row no change frees is a conflict after the retries, and nothing is changed")
    func constraintThatNeverClears() throws {
        let dir = TempDir("applier-unique-conflict")
        defer { dir.cleanup() }
        // Row 2 takes 'A' after row 1 gave it up: the changeset lists row 2 first.
        let (primary, changeset) = try Self.captured(schema: Self.uniqueSchema, setup: "INSERT INTO u VALUES (1, 'A', 0);",
                                                     "INSERT INTO u VALUES (2, 'tmp', 0); UPDATE u SET ref = 'B' WHERE id = 1; UPDATE u SET ref = 'A' WHERE id = 2", in: dir)
        // In step: applies, the INSERT waiting for the UPDATE.
        let inStep = try SQLiteConnection(path: dir.sub("in-step.sqlite"), create: true)
        try inStep.exec(Self.uniqueSchema + "INSERT INTO u VALUES (1, 'A', 0);")
        #expect(try Self.ours(changeset, on: inStep) == nil)
        #expect(try Self.dumpUnique(inStep) == Self.dumpUnique(primary))
        // Diverged: a third row holds 'B', so row 1 can never move and row 2 never enter.
        let diverged = try SQLiteConnection(path: dir.sub("diverged.sqlite"), create: true)
        try diverged.exec(Self.uniqueSchema + "INSERT INTO u VALUES (1, 'A', 0), (3, 'B', 0);")
        let reference = try SQLiteConnection(path: dir.sub("reference.sqlite"), create: true)
        try reference.exec(Self.uniqueSchema + "INSERT INTO u VALUES (1, 'A', 0), (3, 'B', 0);")
        let seen = Self.oracle(changeset, on: reference)
        #expect(seen.rc == SQLITE_ABORT && seen.conflict == SQLITE_CHANGESET_CONSTRAINT)
        let before = try Self.dumpUnique(diverged)
        guard case let .conflict(table, reason) = try Self.ours(changeset, on: diverged) else {
            Issue.record("expected a conflict")
            return
        }
        #expect(table == "u" && reason.contains("UNIQUE"), "\(reason)")
        #expect(try Self.dumpUnique(diverged) == before)
    }

    @Test("a key that is NULL or missing where the row must hold it is malformed (SQLite's changegroup would read past the buffer)")
    func keysMustBeThere() throws {
        // T, 2 columns, key flags 1 0, "t\0"; then an INSERT (18) of (NULL, 1) and of (5, undefined).
        let header: [UInt8] = [UInt8(ascii: "T"), 2, 1, 0, UInt8(ascii: "t"), 0]
        let integerOne: [UInt8] = [1, 0, 0, 0, 0, 0, 0, 0, 1]
        let nullKey = header + [18, 0, 5] + integerOne
        let undefinedValue = header + [18, 0] + integerOne + [0]
        let good = header + [18, 0] + integerOne + integerOne
        let deleteNullKey = header + [9, 0, 5] + integerOne
        let updateNullOldKey = header + [23, 0, 5, 0, 0] + integerOne
        let updateFine = header + [23, 0] + integerOne + integerOne + [0] + integerOne
        for bad in [nullKey, undefinedValue, deleteNullKey, updateNullOldKey] {
            bad.withUnsafeBytes { #expect(!ChangesetApplier.isWellFormed($0), "\(bad)") }
        }
        for fine in [good, updateFine] {
            fine.withUnsafeBytes { #expect(ChangesetApplier.isWellFormed($0), "\(fine)") }
        }
    }

    @Test("a table's own ON CONFLICT clause (REPLACE, IGNORE, ROLLBACK) changes nothing in how a change waits for another",
          arguments: ["REPLACE", "IGNORE", "ROLLBACK"])
    func onConflictClauses(_ clause: String) throws {
        let dir = TempDir("applier-on-conflict")
        defer { dir.cleanup() }
        let schema = "CREATE TABLE u (id INTEGER PRIMARY KEY, ref TEXT NOT NULL UNIQUE ON CONFLICT \(clause), n INTEGER); CREATE TABLE other (id INTEGER PRIMARY KEY);"
        // Row 2 takes 'A' after row 1 gave it up: the changeset lists row 2's INSERT first.
        let (primary, changeset) = try Self.captured(schema: schema, setup: "INSERT INTO u VALUES (1, 'A', 0);",
                                                     "INSERT INTO other VALUES (1); INSERT INTO u VALUES (2, 'tmp', 0); UPDATE u SET ref = 'B' WHERE id = 1; UPDATE u SET ref = 'A' WHERE id = 2", in: dir)
        let replica = try SQLiteConnection(path: dir.sub("replica.sqlite"), create: true)
        try replica.exec(schema + "INSERT INTO u VALUES (1, 'A', 0);")
        #expect(try Self.ours(changeset, on: replica) == nil)
        func dump(_ db: SQLiteConnection) throws -> [[SQLValue]] { try db.rows("SELECT * FROM u ORDER BY id") + db.rows("SELECT * FROM other") }
        #expect(try dump(replica) == dump(primary))
    }
}
