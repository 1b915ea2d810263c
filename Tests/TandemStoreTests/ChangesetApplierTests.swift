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
        let path = dir.sub("primary-\(UUID().uuidString).sqlite")
        let db = try SQLiteConnection(path: path, create: true)
        try db.exec(ChangesetCaptureTests.schema)
        if !setup.isEmpty { try db.exec(setup) }
        let capture = ChangesetCapture(db: db)
        try db.exec("BEGIN")
        try capture.begin()
        try db.exec(sql)
        let changeset = try capture.finish().changeset
        try db.exec("COMMIT")
        return changeset
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
             reason: "cannot be inserted"),
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

    @Test("a table this site lacks, or whose columns differ, is a conflict (sqlite3changeset_apply would skip its rows)")
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
                    "sqlite3changeset_apply skips the table's rows without an error")
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

    @Test("a replica given a malformed changeset record refuses it as a bad record, alone, merged or speculative, and stays where it was")
    func malformedRecordsInTheStore() throws {
        let dir = TempDir("applier-store")
        defer { dir.cleanup() }
        let primary = try telehealthStore(dir.sub("primary"))
        let people = try seedPeople(primary)
        let booked = try primary.execute(booking(1), lsn: people.lsn.next, term: Term(1)).record
        for (index, how) in ["alone", "merged", "speculative"].enumerated() {
            let replica = try telehealthStore(dir.sub("replica-\(index)"))
            // A lone table-header byte: SQLite 3.40's own readers never return on it.
            let bad = LogRecord(term: Term(1), lsn: people.lsn, kind: .changeset, payload: [UInt8(ascii: "T")])
            let attempt: () throws(StoreError) -> Void = switch how {
            case "alone": { () throws(StoreError) in try replica.apply([bad]) }
            case "merged": { () throws(StoreError) in try replica.apply([bad, LogRecord(term: Term(1), lsn: booked.lsn, kind: .changeset, payload: booked.payload)]) }
            default: { () throws(StoreError) in try replica.applySpeculatively([bad]) }
            }
            #expect(throws: StoreError.self, "\(how)") { try attempt() }
            do { try attempt() } catch {
                guard case let .badRecord(lsn, reason) = error else {
                    Issue.record("\(how): expected a bad record, got \(error)")
                    continue
                }
                #expect(lsn == people.lsn && reason.contains("malformed"), "\(how): \(lsn) \(reason)")
            }
            #expect(replica.appliedLSN == people.lsn.previous, "\(how)")
            try replica.apply([people, booked])
            #expect(try replica.stateHash() == primary.stateHash(), "\(how)")
        }
    }
}
