import CSQLite
import Foundation
import TandemModel

/// One site's SQLite database of telehealth state.
///
/// - The primary runs each write batch as one SQLite transaction (`execute`), captures the
///   changeset (`ChangesetCapture`, in the session extension's format), and logs that
///   changeset, not the SQL: every non-deterministic expression is evaluated once. The transaction also stores the
///   inverse changeset in `tandem_undo` and advances the applied LSN, so writes pipeline
///   (the next runs before the previous commits) and an uncommitted tail can be undone.
/// - Replicas apply committed records (`apply`): changeset (or schema SQL) and the
///   applied LSN in one transaction, so a crash neither skips nor repeats a record.
/// - Schema statements are logged as schema records and replayed in log order.
///
/// Thread safety: one owner uses a store at a time (the site's storage actor or the
/// simulator's loop); it is @unchecked Sendable only so that owner may move threads.
public final class StateStore: @unchecked Sendable {
    public let directory: String
    public let clusterID: ClusterID
    public let limits: StoreLimits
    let db: SQLiteConnection
    let databasePath: String
    private let authorizer = Authorizer()
    /// The running time allowed to the client statement being run (0: no limit).
    private let statementClock = StatementClock()
    private var updateMeta: PreparedStatement
    private var insertUndo: PreparedStatement
    /// Kept prepared: it runs with every group of writes and every apply (preparing it
    /// each time was 2.7% of the primary's CPU at 64 clients).
    private var deleteCommittedUndo: PreparedStatement
    /// Captures each write's changeset and inverse (SQLite's pre-update hook).
    private var capture: ChangesetCapture
    /// Applies replicated and undo changesets with statements kept prepared.
    private var applier: ChangesetApplier
    /// The open transaction ran a schema statement: rolling it back may restore an older
    /// schema under a schema version the capture has already seen.
    private var transactionChangedSchema = false
    /// Whether the connection runs foreign key checks and actions, and triggers, now.
    private var actionsOn = true
    /// Client statements already prepared and authorized, by SQL text and authorizer
    /// mode: the same few statements come again and again, and parsing and authorizing
    /// one took about a third of a write's time in the store. Schema statements are never
    /// kept; SQLite prepares a kept statement again by itself after a schema change (and
    /// asks the authorizer again then).
    private var statementCache: [StatementKey: PreparedStatement] = [:]
    static let statementCacheLimit = 256

    /// Compared byte for byte: Swift's String equality treats canonically equivalent text
    /// as equal (a precomposed "é" and "e" with a combining accent), and a kept statement
    /// must be the very bytes the client sent.
    struct StatementKey: Hashable {
        var sql: String
        var mode: Authorizer.Mode

        static func == (a: StatementKey, b: StatementKey) -> Bool { a.mode == b.mode && a.sql.utf8.elementsEqual(b.sql.utf8) }

        func hash(into hasher: inout Hasher) {
            hasher.combine(mode)
            hasher.combine(sql.utf8.count)
            // The bytes in one call; copied first only when not stored contiguously, so
            // that equal texts always feed the hasher the same way.
            if sql.utf8.withContiguousStorageIfAvailable({ hasher.combine(bytes: UnsafeRawBufferPointer($0)) }) == nil {
                Array(sql.utf8).withUnsafeBytes { hasher.combine(bytes: $0) }
            }
        }
    }
    public private(set) var appliedLSN: LSN
    public private(set) var appliedTerm: Term
    public private(set) var schemaVersion: Int
    /// Highest LSN known committed; undo rows at or below it are pruned.
    public internal(set) var committedLSN: LSN = .zero
    private var prunedThrough: LSN = .zero

    /// Testing seam: called inside the apply transaction after the changeset was applied
    /// and before the applied LSN moves. Throwing here models a crash at that point.
    public var crashPointAfterChangeset: (@Sendable (LSN) throws -> Void)?

    static let currentFile = "CURRENT"

    // MARK: Opening

    /// Creates an empty state database. Refuses a directory that already holds one.
    public static func create(directory: String, clusterID: ClusterID, limits: StoreLimits = StoreLimits()) throws(StoreError) -> StateStore {
        if FileManager.default.fileExists(atPath: directory + "/" + currentFile) { throw .alreadyExists(directory) }
        let name = generationName(1)
        try createDatabase(at: directory + "/" + name, clusterID: clusterID, appliedLSN: .zero, appliedTerm: .zero)
        try switchGeneration(directory: directory, to: name)
        return try open(directory: directory, clusterID: clusterID, limits: limits)
    }

    /// Opens the state database of `directory`.
    public static func open(directory: String, clusterID: ClusterID, limits: StoreLimits = StoreLimits()) throws(StoreError) -> StateStore {
        guard let name = try currentGeneration(directory: directory) else { throw .notFound(directory) }
        return try StateStore(directory: directory, databaseName: name, clusterID: clusterID, limits: limits)
    }

    public static func exists(directory: String) -> Bool {
        FileManager.default.fileExists(atPath: directory + "/" + currentFile)
    }

    private init(directory: String, databaseName: String, clusterID: ClusterID, limits: StoreLimits) throws(StoreError) {
        self.directory = directory
        self.clusterID = clusterID
        self.limits = limits
        databasePath = directory + "/" + databaseName
        guard FileManager.default.fileExists(atPath: databasePath) else { throw .notFound(databasePath) }
        do {
            db = try SQLiteConnection(path: databasePath, create: false)
            try Self.configure(db, limits: limits)
            sqlite3_set_authorizer(db.handle, authorizerCallback, Unmanaged.passUnretained(authorizer).toOpaque())
            // Checked every few thousand VM steps: a client statement past its time is
            // interrupted, so no query (a runaway recursive CTE, say) can hold the site's loop.
            sqlite3_progress_handler(db.handle, 4_000, progressCallback, Unmanaged.passUnretained(statementClock).toOpaque())
            let meta = try db.rows("SELECT cluster_id, applied_lsn, applied_term, schema_version FROM tandem_meta WHERE id = 1")
            guard let row = meta.first, case let .text(cid) = row[0], case let .integer(lsn) = row[1],
                  case let .integer(term) = row[2], case let .integer(version) = row[3]
            else { throw StoreError.io("\(databasePath): the tandem_meta row is missing or malformed") }
            guard cid == clusterID.description else { throw StoreError.clusterMismatch(expected: clusterID, found: cid) }
            // A database received in a snapshot is a peer's bytes: a negative value must
            // fail the open, not trap a conversion.
            guard let lsnValue = UInt64(exactly: lsn), let termValue = UInt64(exactly: term), version >= 0 else {
                throw StoreError.io("\(databasePath): tandem_meta holds a negative LSN, term or schema version")
            }
            appliedLSN = LSN(lsnValue)
            appliedTerm = Term(termValue)
            schemaVersion = Int(version)
            updateMeta = try db.prepare("UPDATE tandem_meta SET applied_lsn = ?, applied_term = ?, schema_version = ? WHERE id = 1")
            insertUndo = try db.prepare("INSERT INTO tandem_undo (lsn, kind, previous_term, inverse) VALUES (?, ?, ?, ?)")
            deleteCommittedUndo = try db.prepare("DELETE FROM tandem_undo WHERE lsn <= ?")
            capture = ChangesetCapture(db: db, byteLimit: limits.maxChangesetBytes)
            applier = ChangesetApplier(db: db)
            if let minUndo = try db.rows("SELECT min(lsn) FROM tandem_undo").first?.first, case let .integer(m) = minUndo {
                guard m >= 1 else { throw StoreError.io("\(databasePath): tandem_undo holds LSN \(m)") }
                committedLSN = LSN(UInt64(m - 1))
                prunedThrough = committedLSN
            } else {
                committedLSN = appliedLSN
                prunedThrough = appliedLSN
            }
        } catch let e as StoreError {
            throw e
        } catch let e as SQLiteError {
            throw .sqlite(e, statement: nil)
        } catch {
            throw .io("\(error)")
        }
    }

    /// The database file's size on disk (SQLite's own WAL file not counted); 0 if unknown.
    public var databaseFileBytes: Int {
        let size = (try? FileManager.default.attributesOfItem(atPath: databasePath))?[.size] as? NSNumber
        return size?.intValue ?? 0
    }

    static func configure(_ db: SQLiteConnection, limits: StoreLimits) throws(SQLiteError) {
        // WAL journal; synchronous=NORMAL because the write-ahead log, not SQLite, is the
        // durable record: after a crash the database replays from its applied LSN.
        try db.exec("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -65536")
        sqlite3_limit(db.handle, SQLITE_LIMIT_LENGTH, Int32(clamping: limits.maxValueBytes + 1024))
        sqlite3_limit(db.handle, SQLITE_LIMIT_SQL_LENGTH, Int32(clamping: limits.maxStatementBytes))
        sqlite3_limit(db.handle, SQLITE_LIMIT_VARIABLE_NUMBER, Int32(clamping: limits.maxParameters))
        sqlite3_limit(db.handle, SQLITE_LIMIT_ATTACHED, 0)
    }

    static func createDatabase(at path: String, clusterID: ClusterID, appliedLSN: LSN, appliedTerm: Term) throws(StoreError) {
        do {
            try Durable.makeDirectory((path as NSString).deletingLastPathComponent)
            try? FileManager.default.removeItem(atPath: path)
            let db = try SQLiteConnection(path: path, create: true)
            try configure(db, limits: StoreLimits())
            try db.exec("""
                BEGIN;
                CREATE TABLE tandem_meta (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    cluster_id TEXT NOT NULL,
                    applied_lsn INTEGER NOT NULL,
                    applied_term INTEGER NOT NULL,
                    schema_version INTEGER NOT NULL);
                CREATE TABLE tandem_undo (
                    lsn INTEGER PRIMARY KEY,
                    kind INTEGER NOT NULL,
                    previous_term INTEGER NOT NULL,
                    inverse BLOB);
                COMMIT;
                """)
            _ = try db.rows("INSERT INTO tandem_meta VALUES (1, ?, ?, ?, 0)",
                            [.text(clusterID.description), .integer(Int64(appliedLSN.rawValue)), .integer(Int64(appliedTerm.rawValue))])
            try db.exec("PRAGMA wal_checkpoint(TRUNCATE)")
        } catch let e as SQLiteError {
            throw .sqlite(e, statement: nil)
        } catch {
            throw .io("\(error)")
        }
        try syncFile(path)
    }

    static func syncFile(_ path: String) throws(StoreError) {
        do {
            let fd = try FileDescriptor(path: path, flags: O_RDONLY)
            try fd.sync()
        } catch { throw .io("\(error)") }
    }

    // MARK: Generations (for crash-safe snapshot installs)

    static func generationName(_ n: Int) -> String {
        let s = String(n)
        return "state-" + String(repeating: "0", count: max(0, 6 - s.count)) + s + ".sqlite"
    }

    static func currentGeneration(directory: String) throws(StoreError) -> String? {
        let path = directory + "/" + currentFile
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        let name = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard name.hasPrefix("state-"), name.hasSuffix(".sqlite"), !name.contains("/") else {
            throw .io("\(path) names \"\(name)\", not a state database")
        }
        return name
    }

    /// Points CURRENT at `name` atomically (temp file, fsync, rename, directory fsync),
    /// then removes the other generations.
    static func switchGeneration(directory: String, to name: String) throws(StoreError) {
        do {
            try Durable.writeFile(Array((name + "\n").utf8), to: directory + "/" + currentFile)
        } catch { throw .io("\(error)") }
        let others = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
            .filter { $0.hasPrefix("state-") && !$0.hasPrefix(name) }
        for o in others { try? FileManager.default.removeItem(atPath: directory + "/" + o) }
    }

    static func nextGenerationName(directory: String) throws(StoreError) -> String {
        let current = try currentGeneration(directory: directory) ?? generationName(0)
        let n = Int(current.dropFirst("state-".count).prefix(6)) ?? 0
        return generationName(n + 1)
    }

    // MARK: Executing writes (the primary)

    /// Runs `batch` as one transaction and returns the log record (LSN `lsn`, term
    /// `term`) that replicates it, with each statement's result. Nothing is changed when
    /// it throws. `lsn` must follow the applied LSN.
    public func execute(_ batch: WriteBatch, lsn: LSN, term: Term) throws(StoreError) -> Execution {
        guard lsn == appliedLSN.next else { throw .outOfOrder(expected: appliedLSN.next, got: lsn) }
        guard let result = execute(group: [batch], from: lsn, term: term).first else {
            throw .refused("a batch needs at least one statement", statement: nil)
        }
        return try result.get()
    }

    /// Runs `batches` in order at consecutive LSNs from `first` (which must follow the
    /// applied LSN), in one SQLite transaction: a group of writes the primary received
    /// together costs one commit (one write of each page they share to SQLite's WAL, one
    /// round of file locks) instead of one each, which was most of a write's cost here.
    /// Each batch runs under a savepoint of its own, so one that fails takes no LSN and
    /// changes nothing, and the others keep theirs; its changeset, inverse and undo row are
    /// its own, as if it had run alone. If the transaction cannot commit, every batch fails
    /// with that error and nothing changes.
    ///
    /// Returns one result per batch carried out, in order: all of `batches`, or a prefix
    /// (never empty) when the group ran past `maxGroupNanoseconds`. The rest were not
    /// started; the caller offers them again, after whatever else its loop must do.
    public func execute(group batches: [WriteBatch], from first: LSN, term: Term) -> [Result<Execution, StoreError>] {
        guard !batches.isEmpty else { return [] }
        guard first == appliedLSN.next else {
            let e = StoreError.outOfOrder(expected: appliedLSN.next, got: first)
            return batches.map { _ in .failure(e) }
        }
        // A write whose failure took the whole transaction with it (a statement timeout,
        // an OR ROLLBACK conflict clause, RAISE(ROLLBACK), an I/O error) is set aside with
        // its error and the group runs again without it: one client's write must not fail
        // the others. Each round sets one write aside, so this ends.
        var setAside: [Int: StoreError] = [:]
        let groupDeadline = deadline(after: limits.maxGroupNanoseconds)
        while true {
            switch attempt(batches, setAside: setAside, from: first, term: term, groupDeadline: groupDeadline) {
            case let .done(results): return results
            case let .again(index, error): setAside[index] = error
            }
        }
    }

    private enum GroupAttempt {
        case done([Result<Execution, StoreError>])
        /// The write at `index` failed and SQLite rolled back the whole transaction.
        case again(index: Int, error: StoreError)
    }

    /// `groupDeadline`: no write after the first starts past it (0: none), except those a
    /// previous attempt already ran (the ones before a write set aside), which must run again.
    private func attempt(_ batches: [WriteBatch], setAside: [Int: StoreError], from first: LSN, term: Term,
                         groupDeadline: UInt64) -> GroupAttempt {
        authorizer.mode = .internal
        do {
            try setActions(true)
            try db.execKept("BEGIN IMMEDIATE")
        } catch {
            let e = Self.storeError(error)
            return .done(batches.map { _ in .failure(e) })
        }
        // Savepoints only when there is something to keep apart (a lone write rolls the
        // whole transaction back instead).
        let grouped = batches.count > 1
        var results: [Result<Execution, StoreError>] = []
        var lsn = first
        var previousTerm = appliedTerm
        var version = schemaVersion
        do { try withInternal { try pruneUndo() } } catch {
            rollbackTransaction()
            return .done(batches.map { _ in .failure(error) })
        }
        let mustRun = setAside.keys.max() ?? 0
        for (index, batch) in batches.enumerated() {
            if let error = setAside[index] {
                results.append(.failure(error))
                continue
            }
            if index > mustRun && groupDeadline != 0 && monotonicNanoseconds() > groupDeadline { break }
            do throws(StoreError) {
                if grouped { try withInternal { try db.execKept("SAVEPOINT tandem_write") } }
                let e = try executeInTransaction(batch, lsn: lsn, term: term, previousTerm: previousTerm)
                if grouped {
                    // RELEASE does not check deferred foreign keys (only COMMIT does): a
                    // write that leaves one unresolved fails here, on its own, so that no
                    // record depends on a later one to be valid.
                    if deferredForeignKeyViolations() > 0 {
                        throw StoreError.sqlite(SQLiteError(code: SQLITE_CONSTRAINT, extendedCode: SQLITE_CONSTRAINT | (3 << 8),  // SQLITE_CONSTRAINT_FOREIGNKEY (a macro Swift does not see)
                                                            message: "FOREIGN KEY constraint failed"), statement: nil)
                    }
                    try withInternal { try db.execKept("RELEASE tandem_write") }
                }
                if e.record.kind == .schema && batch.schemaVersion > 0 { version = batch.schemaVersion }
                results.append(.success(e))
                previousTerm = term
                lsn = lsn.next
            } catch {
                guard grouped else {
                    rollbackTransaction()
                    return .done([.failure(error)])
                }
                guard db.inTransaction else {
                    // SQLite rolled the whole transaction back itself; the rest is the same.
                    rollbackTransaction()
                    return .again(index: index, error: error)
                }
                do {
                    try withInternal { try db.exec("ROLLBACK TO tandem_write; RELEASE tandem_write") }
                    if transactionChangedSchema { forgetSchema() }
                } catch let undo {
                    // The transaction cannot be trusted to hold only the earlier writes.
                    rollbackTransaction()
                    return .done(batches.map { _ in .failure(undo) })
                }
                results.append(.failure(error))
            }
        }
        guard lsn > first else {
            rollbackTransaction()
            return .done(results)
        }
        do {
            try withInternal {
                try setApplied(lsn.previous, term, version: version)
                try db.execKept("COMMIT")
            }
        } catch {
            rollbackTransaction()
            return .done(results.map { r in r.flatMap { _ in .failure(error) } })
        }
        transactionChangedSchema = false
        appliedLSN = lsn.previous
        appliedTerm = term
        schemaVersion = version
        return .done(results)
    }

    /// Deferred foreign-key violations the open transaction holds now.
    private func deferredForeignKeyViolations() -> Int32 {
        var current: Int32 = 0
        var highest: Int32 = 0
        _ = sqlite3_db_status(db.handle, SQLITE_DBSTATUS_DEFERRED_FKS, &current, &highest, 0)
        return current
    }

    /// One batch inside the open transaction: its statements, changeset (or schema
    /// record), inverse and undo row. Throws with the batch's changes still to be undone
    /// by the caller.
    private func executeInTransaction(_ batch: WriteBatch, lsn: LSN, term: Term, previousTerm: Term) throws(StoreError) -> Execution {
        try check(batch)
        try withInternal { try capture.begin() }
        var captured = false
        defer { if !captured { capture.discard() } }
        var results: [StatementResult] = []
        var isSchema: Bool?
        var resultBytes = 0
        // One deadline for all the write's statements; none for a configured migration,
        // which must complete for the schema version to advance.
        let deadline = batch.schemaVersion > 0 ? 0 : clientDeadline()
        for (i, s) in batch.statements.enumerated() {
            let (result, ddl) = try run(s, index: i, mode: .write, deadline: deadline, resultBytes: &resultBytes)
            if ddl { transactionChangedSchema = true }
            if s.requireChanges && result.rowsAffected == 0 {
                throw StoreError.preconditionFailed(statement: i)
            }
            if let isSchema, isSchema != ddl {
                throw StoreError.refused("schema statements (CREATE, ALTER, DROP) must be in a batch of their own, not mixed with data statements", statement: i)
            }
            isSchema = ddl
            results.append(result)
        }
        let kind: RecordKind
        let payload: [UInt8]
        var inverse: [UInt8]?
        if isSchema == true {
            capture.discard()
            captured = true
            try requirePrimaryKeys()
            kind = .schema
            payload = SchemaPayload.encode(batch)
        } else {
            kind = .changeset
            // Ended before the undo row goes in, which is not part of the write.
            captured = true
            (payload, inverse) = try withInternal { try capture.finish() }
        }
        guard payload.count <= limits.maxChangesetBytes else {
            throw StoreError.tooLarge(what: "the batch's changeset", size: payload.count, limit: limits.maxChangesetBytes)
        }
        try withInternal {
            insertUndo.reset()
            try insertUndo.bind([.integer(Int64(lsn.rawValue)), .integer(Int64(kind.rawValue)),
                                 .integer(Int64(previousTerm.rawValue)), inverse.map { .blob($0) } ?? .null])
            _ = try insertUndo.step()
        }
        return Execution(record: LogRecord(term: term, lsn: lsn, kind: kind, payload: payload), results: results)
    }

    private func check(_ batch: WriteBatch) throws(StoreError) {
        guard !batch.statements.isEmpty else { throw .refused("a batch needs at least one statement", statement: nil) }
        guard batch.statements.count <= limits.maxStatements else {
            throw .refused("\(batch.statements.count) statements exceed the limit of \(limits.maxStatements) per batch", statement: nil)
        }
        for (i, s) in batch.statements.enumerated() {
            let n = s.sql.utf8.count
            guard n <= limits.maxStatementBytes else { throw .tooLarge(what: "statement \(i + 1)'s SQL", size: n, limit: limits.maxStatementBytes) }
            guard s.params.count <= limits.maxParameters else {
                throw .refused("\(s.params.count) parameters exceed the limit of \(limits.maxParameters)", statement: i)
            }
            for p in s.params where p.byteCount > limits.maxValueBytes {
                throw .tooLarge(what: "a value bound to statement \(i + 1)", size: p.byteCount, limit: limits.maxValueBytes)
            }
        }
    }

    /// Prepares, binds and runs one user statement. Returns its result and whether it
    /// was schema (DDL).
    /// `deadline`: when the write or query it belongs to must stop (monotonic
    /// nanoseconds; 0: never, for committed records replayed from the log).
    private func run(_ s: SQLStatement, index: Int, mode: Authorizer.Mode, deadline: UInt64,
                     resultBytes: inout Int) throws(StoreError) -> (StatementResult, Bool) {
        // SQLite's progress handler interrupts a statement that runs past the deadline,
        // but a short statement never reaches it: check before each one too.
        if deadline != 0 && monotonicNanoseconds() > deadline { throw timedOut(statement: index) }
        authorizer.begin(mode)
        statementClock.deadline = deadline
        defer {
            authorizer.mode = .internal
            statementClock.deadline = 0
        }
        let key = StatementKey(sql: s.sql, mode: mode)
        let prepared: PreparedStatement
        let ddl: Bool
        if let kept = statementCache[key] {
            prepared = kept
            ddl = false
        } else {
            var stmt: OpaquePointer?
            var tail: UnsafePointer<CChar>?
            let rc = s.sql.withCString { sqlite3_prepare_v2(db.handle, $0, -1, &stmt, &tail).also { _ in
                // One statement per entry: anything after the first must be blank or comments.
                if let tail, !Self.isBlank(tail) { authorizer.extraText = true }
            } }
            guard rc == SQLITE_OK else {
                if let denial = authorizer.denial { throw .refused(denial, statement: index) }
                throw .sqlite(db.lastError, statement: index)
            }
            guard let stmt else { throw .refused("the statement is empty", statement: index) }
            prepared = PreparedStatement(stmt, connection: db)
            if authorizer.extraText {
                throw .refused("one SQL statement per entry: send further statements as further entries", statement: index)
            }
            if mode == .read && !prepared.isReadOnly {
                throw .refused("a query must not write: use execute", statement: index)
            }
            ddl = authorizer.sawDDL
            if !ddl && !authorizer.sawPragma {
                if statementCache.count >= Self.statementCacheLimit { statementCache.removeAll() }
                statementCache[key] = prepared
            }
        }
        // Ready for its next use (a kept statement), and no read left open.
        defer { prepared.reset() }
        do {
            try prepared.bind(s.params)
            var rows: [[SQLValue]] = []
            while try prepared.step() {
                let row = prepared.row()
                rows.append(row)
                resultBytes += row.reduce(0) { $0 + $1.byteCount }
                guard rows.count <= limits.maxRows else {
                    throw StoreError.tooLarge(what: "result of more than \(limits.maxRows) rows", size: rows.count, limit: limits.maxRows)
                }
                guard resultBytes <= limits.maxResultBytes else {
                    throw StoreError.tooLarge(what: "result", size: resultBytes, limit: limits.maxResultBytes)
                }
            }
            let readOnly = prepared.isReadOnly
            let result = StatementResult(rowsAffected: readOnly ? 0 : db.changes, lastInsertRowID: db.lastInsertRowID,
                                         columns: prepared.columnNames, rows: rows)
            return (result, ddl)
        } catch let e as StoreError {
            throw e
        } catch let e as SQLiteError {
            if let denial = authorizer.denial { throw .refused(denial, statement: index) }
            if e.code & 0xFF == SQLITE_INTERRUPT { throw timedOut(statement: index) }
            throw .sqlite(e, statement: index)
        } catch {
            throw .io("\(error)")
        }
    }

    /// Whether the text after a prepared statement is empty or whitespace. ASCII is checked
    /// byte by byte (Foundation's trimming, run for every statement, cost more than
    /// SQLite's parse); other text goes through Foundation's Unicode whitespace rules.
    static func isBlank(_ tail: UnsafePointer<CChar>) -> Bool {
        var p = tail
        while true {
            switch UInt8(bitPattern: p.pointee) {
            case 0: return true
            case 0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D: p += 1
            case 0x80...:
                return String(cString: p).trimmingCharacters(in: .whitespacesAndNewlines).isEmpty
            default: return false
            }
        }
    }

    private func invert(_ changeset: ArraySlice<UInt8>, lsn: LSN) throws(StoreError) -> [UInt8] {
        guard !changeset.isEmpty else { return [] }
        try requireWellFormed(changeset, lsn: lsn)
        var n: Int32 = 0
        var p: UnsafeMutableRawPointer?
        let rc = changeset.withUnsafeBytes { sqlite3changeset_invert(Int32($0.count), $0.baseAddress, &n, &p) }
        defer { sqlite3_free(p) }
        guard rc == SQLITE_OK, let p else { throw .badRecord(lsn: lsn, reason: "cannot invert the changeset (SQLite code \(rc))") }
        return [UInt8](UnsafeRawBufferPointer(start: p, count: Int(n)))
    }

    /// Every user table must have a declared primary key, or its rows would silently not
    /// be replicated: changes are captured by primary key.
    private func requirePrimaryKeys() throws(StoreError) {
        try withInternal {
            let tables = try db.rows("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE 'tandem\\_%' ESCAPE '\\'")
            for t in tables {
                guard case let .text(name) = t[0] else { continue }
                let pk = try db.rows("SELECT count(*) FROM pragma_table_info(?) WHERE pk > 0", [.text(name)])
                if pk.first?.first == .integer(0) { throw StoreError.noPrimaryKey(table: name) }
            }
        }
    }

    private func setApplied(_ lsn: LSN, _ term: Term, version: Int) throws {
        updateMeta.reset()
        try updateMeta.bind([.integer(Int64(lsn.rawValue)), .integer(Int64(term.rawValue)), .integer(Int64(version))])
        _ = try updateMeta.step()
    }

    private func pruneUndo() throws {
        guard committedLSN > prunedThrough else { return }
        deleteCommittedUndo.reset()
        try deleteCommittedUndo.bind([.integer(Int64(committedLSN.rawValue))])
        _ = try deleteCommittedUndo.step()
        deleteCommittedUndo.reset()
        prunedThrough = committedLSN
    }

    private func withInternal<T>(_ body: () throws -> T) throws(StoreError) -> T {
        authorizer.mode = .internal
        do { return try body() } catch { throw Self.storeError(error) }
    }

    private func rollbackTransaction() {
        authorizer.mode = .internal
        if db.inTransaction { try? db.exec("ROLLBACK") }
        if transactionChangedSchema { forgetSchema() }
        transactionChangedSchema = false
    }

    /// A schema change was rolled back: SQLite may give the next one the same schema
    /// version number, so what was read under it is forgotten.
    private func forgetSchema() {
        capture.forgetSchema()
        applier.invalidate()
    }

    static func storeError(_ error: any Error) -> StoreError {
        switch error {
        case let e as StoreError: e
        case let e as SQLiteError: .sqlite(e, statement: nil)
        default: .io("\(error)")
        }
    }

    // MARK: Commit and undo

    /// Records that every record up to `lsn` is committed: their undo rows are dropped
    /// with the next transaction, and they can never be rolled back.
    public func markCommitted(through lsn: LSN) {
        if lsn > committedLSN { committedLSN = min(lsn, appliedLSN) }
    }

    /// Undoes the speculative records after `lsn` (a deposed primary's uncommitted tail),
    /// newest first, in one transaction. Throws `needsRebuild` when the tail cannot be
    /// undone in place (a schema change in it, or missing undo rows).
    public func rollback(to lsn: LSN) throws(StoreError) {
        guard lsn < appliedLSN else { return }
        guard lsn >= committedLSN else {
            throw .needsRebuild("asked to roll back to \(lsn), below the committed LSN \(committedLSN)")
        }
        do {
            try setActions(false)
            try db.exec("BEGIN IMMEDIATE")
            authorizer.mode = .internal
            let rows = try db.rows("SELECT lsn, kind, previous_term, inverse FROM tandem_undo WHERE lsn > ? ORDER BY lsn DESC",
                                   [.integer(Int64(lsn.rawValue))])
            guard rows.count == Int(appliedLSN.rawValue - lsn.rawValue),
                  rows.first?[0] == .integer(Int64(appliedLSN.rawValue))
            else {
                throw StoreError.needsRebuild("records \(lsn.next)...\(appliedLSN) were applied without undo information")
            }
            var previousTerm = appliedTerm
            for row in rows {
                guard case let .integer(l) = row[0], case let .integer(k) = row[1], case let .integer(pt) = row[2] else { continue }
                if k == Int64(RecordKind.schema.rawValue) {
                    throw StoreError.needsRebuild("the uncommitted tail holds a schema change at LSN \(l)")
                }
                if case let .blob(inverse) = row[3], !inverse.isEmpty {
                    try applyChangeset(inverse[...], lsn: LSN(UInt64(l)))
                }
                previousTerm = Term(UInt64(pt))
            }
            _ = try db.rows("DELETE FROM tandem_undo WHERE lsn > ?", [.integer(Int64(lsn.rawValue))])
            try setApplied(lsn, previousTerm, version: schemaVersion)
            try db.exec("COMMIT")
            appliedLSN = lsn
            appliedTerm = previousTerm
        } catch {
            rollbackTransaction()
            throw Self.storeError(error)
        }
    }

    // MARK: Applying committed records (replicas)

    /// Applies committed records in order, in one transaction with the applied LSN (one per
    /// run of changesets, one per schema record: see `runs`), so a crash or a failure
    /// leaves the applied LSN at the end of the last run applied in full.
    ///
    /// Each changeset is applied as it is, in log order: the applier keeps its statements
    /// prepared, so merging a run first (sqlite3changegroup, as before) saved nothing and
    /// cost a parse, a hash table and a copy per record (`tandem-bench apply`, PERFORMANCE.md).
    public func apply(_ records: [LogRecord]) throws(StoreError) {
        for run in Self.runs(records) { try apply(run, keepUndo: false) }
    }

    /// Applies records that are not yet known to be committed (a new primary's log tail,
    /// and its no-op), keeping each one's inverse so they can be undone like executed
    /// writes (`rollback`). The committed LSN does not move.
    public func applySpeculatively(_ records: [LogRecord]) throws(StoreError) {
        for run in Self.runs(records) { try apply(run, keepUndo: true) }
    }

    /// `records` cut so that each schema record stands alone. Changesets are applied with
    /// foreign keys and triggers off: a changeset already holds every row the primary's
    /// foreign key actions (ON DELETE CASCADE, SET NULL, ...) and triggers changed, and
    /// running them again would change those rows twice (a conflict, and a stopped
    /// replica). A schema record is replayed as its SQL with both on, as it ran on the
    /// primary (a DROP TABLE deletes the rows that reference it first). SQLite ignores
    /// the foreign key setting inside a transaction, hence one transaction per kind.
    static func runs(_ records: [LogRecord]) -> [ArraySlice<LogRecord>] {
        var runs: [ArraySlice<LogRecord>] = []
        var start = records.startIndex
        for i in records.indices where records[i].kind == .schema {
            if start < i { runs.append(records[start..<i]) }
            runs.append(records[i...i])
            start = i + 1
        }
        if start < records.endIndex { runs.append(records[start...]) }
        return runs
    }

    /// Foreign keys and triggers run where writes execute and schema records replay, and
    /// not where changesets are applied or undone (see `runs`). Set outside a transaction;
    /// rare (a change of role), so not kept prepared: SQLite applies both settings to
    /// statements prepared afterwards, and `sqlite3changeset_apply` prepares its own.
    private func setActions(_ on: Bool) throws(StoreError) {
        guard on != actionsOn else { return }
        guard !db.inTransaction else { throw .io("foreign keys and triggers cannot be switched inside a transaction") }
        authorizer.mode = .internal
        do { try db.exec(on ? "PRAGMA foreign_keys = ON" : "PRAGMA foreign_keys = OFF") } catch { throw .sqlite(error, statement: nil) }
        let rc = tandem_sqlite_enable_triggers(db.handle, on ? 1 : 0)
        guard rc == SQLITE_OK else { throw .sqlite(db.lastError, statement: nil) }
        actionsOn = on
        // SQLite compiles both settings into statements prepared under them.
        applier.invalidate()
    }

    private func apply(_ records: ArraySlice<LogRecord>, keepUndo: Bool) throws(StoreError) {
        guard let first = records.first else { return }
        guard first.lsn == appliedLSN.next else { throw .outOfOrder(expected: appliedLSN.next, got: first.lsn) }
        try setActions(first.kind == .schema)
        authorizer.mode = .internal
        do { try db.execKept("BEGIN IMMEDIATE") } catch { throw .sqlite(error, statement: nil) }
        do {
            var lsn = appliedLSN
            var term = appliedTerm
            var version = schemaVersion
            for r in records {
                guard r.lsn == lsn.next else { throw StoreError.outOfOrder(expected: lsn.next, got: r.lsn) }
                switch r.kind {
                case .noop:
                    break
                case .changeset:
                    if !r.payload.isEmpty { try applyChangeset(r.payload, lsn: r.lsn) }
                    try crashPointAfterChangeset?(r.lsn)
                case .schema:
                    transactionChangedSchema = true
                    let batch: WriteBatch
                    do { batch = try SchemaPayload.decode(Array(r.payload)) } catch {
                        throw StoreError.badRecord(lsn: r.lsn, reason: "\(error)")
                    }
                    var ignored = 0
                    for (i, s) in batch.statements.enumerated() {
                        // Committed: it must apply here whatever it costs (0: no deadline).
                        do { _ = try run(s, index: i, mode: .replay, deadline: 0, resultBytes: &ignored) } catch {
                            throw StoreError.badRecord(lsn: r.lsn, reason: "schema statement \(i + 1) failed on replay: \(error)")
                        }
                    }
                    if batch.schemaVersion > 0 { version = batch.schemaVersion }
                    try crashPointAfterChangeset?(r.lsn)
                }
                if keepUndo {
                    let inverse: SQLValue = switch r.kind {
                    case .changeset: r.payload.isEmpty ? .blob([]) : .blob(try invert(r.payload, lsn: r.lsn))
                    case .noop: .blob([])
                    case .schema: .null
                    }
                    try withInternal {
                        insertUndo.reset()
                        try insertUndo.bind([.integer(Int64(r.lsn.rawValue)), .integer(Int64(r.kind.rawValue)),
                                             .integer(Int64(term.rawValue)), inverse])
                        _ = try insertUndo.step()
                    }
                }
                lsn = r.lsn
                term = r.term
            }
            try withInternal {
                try pruneUndo()
                try setApplied(lsn, term, version: version)
                try db.execKept("COMMIT")
            }
            transactionChangedSchema = false
            appliedLSN = lsn
            appliedTerm = term
            schemaVersion = version
            if committedLSN < lsn && !keepUndo { committedLSN = lsn }
        } catch {
            rollbackTransaction()
            throw Self.storeError(error)
        }
    }

    /// Applies a changeset; any conflict aborts it: on a replica applying the committed
    /// log in order, a conflict means divergence, never something to paper over. The
    /// caller's transaction is rolled back on any error (the changes are partial).
    private func applyChangeset(_ changeset: ArraySlice<UInt8>, lsn: LSN) throws {
        authorizer.mode = .internal
        let failure: ChangesetApplier.Failure? = changeset.withUnsafeBytes { buf in
            do throws(ChangesetApplier.Failure) { try applier.apply(buf) } catch { return error }
            return nil
        }
        switch failure {
        case nil: return
        case let .conflict(table, reason): throw StoreError.conflict(lsn: lsn, table: table, reason: reason)
        case let .malformed(code): throw StoreError.badRecord(lsn: lsn, reason: "the changeset is malformed (SQLite code \(code))")
        case let .sqlite(e): throw StoreError.sqlite(e, statement: nil)
        }
    }

    private func timedOut(statement: Int) -> StoreError {
        .statementTimedOut(statement: statement, limitMilliseconds: Int(limits.maxWriteNanoseconds / 1_000_000))
    }

    /// When a client write or query starting now must stop (0: no limit).
    private func clientDeadline() -> UInt64 { deadline(after: limits.maxWriteNanoseconds) }

    /// `limit` from now, in monotonic nanoseconds (0, no limit, stays 0).
    private func deadline(after limit: UInt64) -> UInt64 { limit == 0 ? 0 : monotonicNanoseconds() + limit }

    // MARK: Reading

    /// Runs a read-only query against this site's state.
    public func query(_ statement: SQLStatement) throws(StoreError) -> QueryResult {
        try check(WriteBatch([statement]))
        var bytes = 0
        let (result, _) = try run(statement, index: 0, mode: .read, deadline: clientDeadline(), resultBytes: &bytes)
        if db.inTransaction { rollbackTransaction() }
        return QueryResult(columns: result.columns, rows: result.rows, appliedLSN: appliedLSN)
    }

    /// The number of uncommitted (speculative) records this store holds undo rows for.
    public func undoDepth() throws(StoreError) -> Int {
        try withInternal {
            guard case let .integer(n) = try db.rows("SELECT count(*) FROM tandem_undo WHERE lsn > ?",
                                                     [.integer(Int64(committedLSN.rawValue))]).first?.first else { return 0 }
            return Int(n)
        }
    }

    /// Makes the applied state durable in the database file (a checkpoint with fsync),
    /// so the log before it may be removed.
    public func checkpoint() throws(StoreError) {
        do { try db.exec("PRAGMA wal_checkpoint(TRUNCATE)") } catch { throw .sqlite(error, statement: nil) }
        try Self.syncFile(databasePath)
    }
}

extension Int32 {
    fileprivate func also(_ body: (Int32) -> Void) -> Int32 {
        body(self)
        return self
    }
}

/// Collects what the SQLite authorizer saw while a statement was prepared, and refuses
/// what must never run through the SQL interface.
final class Authorizer {
    enum Mode { case `internal`, write, replay, read }
    var mode: Mode = .internal
    var sawDDL = false
    /// A PRAGMA was read: its answer may depend on more than the schema, so the statement
    /// is not kept prepared.
    var sawPragma = false
    var denial: String?
    var extraText = false

    func begin(_ mode: Mode) {
        self.mode = mode
        sawDDL = false
        sawPragma = false
        denial = nil
        extraText = false
    }

    /// The actions `decide` looks at; every other one is allowed (SQLITE_OK).
    static let namedActions: Set<Int32> = [
        SQLITE_CREATE_TABLE, SQLITE_DROP_TABLE, SQLITE_CREATE_VIEW, SQLITE_DROP_VIEW, SQLITE_CREATE_INDEX, SQLITE_DROP_INDEX,
        SQLITE_CREATE_TRIGGER, SQLITE_DROP_TRIGGER, SQLITE_ALTER_TABLE, SQLITE_CREATE_TEMP_TABLE, SQLITE_CREATE_TEMP_INDEX,
        SQLITE_CREATE_TEMP_TRIGGER, SQLITE_CREATE_TEMP_VIEW, SQLITE_DROP_TEMP_TABLE, SQLITE_DROP_TEMP_INDEX,
        SQLITE_DROP_TEMP_TRIGGER, SQLITE_DROP_TEMP_VIEW, SQLITE_CREATE_VTABLE, SQLITE_DROP_VTABLE, SQLITE_INSERT, SQLITE_UPDATE,
        SQLITE_DELETE, SQLITE_TRANSACTION, SQLITE_SAVEPOINT, SQLITE_ATTACH, SQLITE_DETACH, SQLITE_PRAGMA, SQLITE_ANALYZE,
    ]

    func decide(_ action: Int32, _ a3: String?, _ a4: String?) -> Int32 {
        if mode == .internal { return SQLITE_OK }
        func isReserved(_ name: String?) -> Bool { name?.lowercased().hasPrefix("tandem_") == true }
        func deny(_ why: String) -> Int32 {
            if denial == nil { denial = why }
            return SQLITE_DENY
        }
        switch action {
        case SQLITE_CREATE_TABLE, SQLITE_DROP_TABLE, SQLITE_CREATE_VIEW, SQLITE_DROP_VIEW:
            if isReserved(a3) { return deny("tables named tandem_* belong to Tandem and cannot be changed through SQL") }
            sawDDL = true
        case SQLITE_CREATE_INDEX, SQLITE_DROP_INDEX, SQLITE_CREATE_TRIGGER, SQLITE_DROP_TRIGGER:
            if isReserved(a4) { return deny("tables named tandem_* belong to Tandem and cannot be changed through SQL") }
            sawDDL = true
        case SQLITE_ALTER_TABLE:
            if isReserved(a4) { return deny("tables named tandem_* belong to Tandem and cannot be changed through SQL") }
            sawDDL = true
        case SQLITE_ANALYZE:
            // Its statistics (sqlite_stat1) are logged as the statement and recomputed on
            // every site from the same rows, in log order, like a schema change.
            sawDDL = true
        case SQLITE_CREATE_TEMP_TABLE, SQLITE_CREATE_TEMP_INDEX, SQLITE_CREATE_TEMP_TRIGGER, SQLITE_CREATE_TEMP_VIEW,
             SQLITE_DROP_TEMP_TABLE, SQLITE_DROP_TEMP_INDEX, SQLITE_DROP_TEMP_TRIGGER, SQLITE_DROP_TEMP_VIEW:
            return deny("temporary tables, views and triggers are not replicated and are refused")
        case SQLITE_CREATE_VTABLE, SQLITE_DROP_VTABLE:
            return deny("virtual tables are not replicated and are refused")
        case SQLITE_INSERT, SQLITE_UPDATE, SQLITE_DELETE:
            if mode == .read { return deny("a query must not write: use execute") }
            if isReserved(a3) { return deny("the metadata table \(a3 ?? "") is written by Tandem only") }
        case SQLITE_TRANSACTION, SQLITE_SAVEPOINT:
            return deny("transaction control is refused: each batch already runs as one transaction")
        case SQLITE_ATTACH, SQLITE_DETACH:
            return deny("ATTACH and DETACH are refused: only the replicated database is reachable")
        case SQLITE_PRAGMA:
            sawPragma = true
            let name = a3?.lowercased() ?? ""
            let readable: Set<String> = ["table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"]
            // Read-only introspection is harmless.
            if readable.contains(name) { return SQLITE_OK }
            return deny("PRAGMA \(name) is refused: settings are not replicated")
        default:
            break
        }
        return SQLITE_OK
    }
}

/// The deadline of the client statement being run, read by SQLite's progress handler.
final class StatementClock {
    var deadline: UInt64 = 0
}

private let progressCallback: @convention(c) (UnsafeMutableRawPointer?) -> Int32 = { ctx in
    guard let ctx else { return 0 }
    let clock = Unmanaged<StatementClock>.fromOpaque(ctx).takeUnretainedValue()
    return clock.deadline != 0 && monotonicNanoseconds() > clock.deadline ? 1 : 0
}

private let authorizerCallback: @convention(c) (UnsafeMutableRawPointer?, Int32, UnsafePointer<CChar>?, UnsafePointer<CChar>?,
                                                UnsafePointer<CChar>?, UnsafePointer<CChar>?) -> Int32 = { ctx, action, a3, a4, _, _ in
    guard let ctx else { return SQLITE_OK }
    let auth = Unmanaged<Authorizer>.fromOpaque(ctx).takeUnretainedValue()
    // Most calls (a column read, a function) need no names: no strings are made for them.
    if auth.mode == .internal || !Authorizer.namedActions.contains(action) { return SQLITE_OK }
    return auth.decide(action, a3.map { String(cString: $0) }, a4.map { String(cString: $0) })
}

/// Refuses a changeset whose structure is broken, before any SQLite changeset reader
/// sees it: SQLite 3.40's may never return on malformed input.
private func requireWellFormed(_ changeset: ArraySlice<UInt8>, lsn: LSN) throws(StoreError) {
    guard changeset.withUnsafeBytes({ ChangesetApplier.isWellFormed($0) }) else {
        throw .badRecord(lsn: lsn, reason: "the changeset is malformed")
    }
}
