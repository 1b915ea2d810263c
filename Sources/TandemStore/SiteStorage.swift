import Foundation
import Glibc
import TandemModel
import TandemWAL

/// A site's durable state: its write-ahead log, its state database and its latest local
/// snapshot, kept consistent with each other across crashes.
///
/// Layout of the data directory:
///
///     wal/         log segments
///     state/       CURRENT and the state database generation it names
///     snapshots/   the latest local snapshot, `snapshot.tsnap`
///
/// The invariant it restores on open and keeps after each call: the database equals the
/// result of applying the log from the start (or from the snapshot) up to its applied
/// LSN, and every applied record above the committed LSN can be undone.
///
/// Thread safety: one owner at a time, like `StateStore`.
public final class SiteStorage: @unchecked Sendable {
    public let dataDirectory: String
    public let clusterID: ClusterID
    public let log: WriteAheadLog
    public private(set) var store: StateStore
    public let limits: StoreLimits
    /// How the reconciliation at open went, for logs and tests.
    public private(set) var openReport: [String] = []

    var walDirectory: String { dataDirectory + "/wal" }
    var stateDirectory: String { dataDirectory + "/state" }
    var snapshotDirectory: String { dataDirectory + "/snapshots" }
    public var snapshotPath: String { snapshotDirectory + "/snapshot.tsnap" }

    /// Creates the storage of a new site. Refuses a data directory that already holds
    /// any of it: a cluster is never bootstrapped by accident over existing data.
    public static func bootstrap(dataDirectory: String, clusterID: ClusterID, walOptions: WALOptions = WALOptions(),
                                 limits: StoreLimits = StoreLimits()) throws -> SiteStorage {
        if WriteAheadLog.exists(directory: dataDirectory + "/wal") || StateStore.exists(directory: dataDirectory + "/state") {
            throw StoreError.alreadyExists(dataDirectory)
        }
        try FileManager.default.createDirectory(atPath: dataDirectory, withIntermediateDirectories: true)
        let lock = try lockDirectory(dataDirectory)
        do {
            let log = try WriteAheadLog.create(directory: dataDirectory + "/wal", clusterID: clusterID, options: walOptions)
            let store = try StateStore.create(directory: dataDirectory + "/state", clusterID: clusterID, limits: limits)
            try Durable.makeDirectory(dataDirectory + "/snapshots")
            return SiteStorage(dataDirectory: dataDirectory, clusterID: clusterID, log: log, store: store, limits: limits, lock: lock)
        } catch {
            Glibc.close(lock)
            throw error
        }
    }

    /// Whether `dataDirectory` holds a site's storage (its log or its database).
    public static func exists(dataDirectory: String) -> Bool {
        WriteAheadLog.exists(directory: dataDirectory + "/wal") || StateStore.exists(directory: dataDirectory + "/state")
    }

    /// Opens existing storage and reconciles the database with the log.
    public static func open(dataDirectory: String, clusterID: ClusterID, walOptions: WALOptions = WALOptions(),
                            limits: StoreLimits = StoreLimits()) throws -> SiteStorage {
        let lock = try lockDirectory(dataDirectory)
        do {
            let log = try WriteAheadLog.open(directory: dataDirectory + "/wal", clusterID: clusterID, options: walOptions)
            let store = try StateStore.open(directory: dataDirectory + "/state", clusterID: clusterID, limits: limits)
            let site = SiteStorage(dataDirectory: dataDirectory, clusterID: clusterID, log: log, store: store, limits: limits, lock: lock)
            try site.reconcile()
            return site
        } catch {
            Glibc.close(lock)
            throw error
        }
    }

    /// One process at a time in a data directory: an exclusive lock on its LOCK file, held
    /// while the storage is open (a second tandemd, or tandemctl rebuild or inspect on a
    /// running site, is refused instead of recovering a live log).
    static func lockDirectory(_ dataDirectory: String) throws -> Int32 {
        let path = dataDirectory + "/LOCK"
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw StoreError.io("cannot open \(path): \(String(cString: strerror(errno)))") }
        // A lock just released can linger for a moment: a child process this one is
        // spawning holds copies of its descriptors until it execs (O_CLOEXEC closes them
        // then). A few tries over 200 ms tell that from a site really in use.
        var tries = 0
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let busy = errno == EWOULDBLOCK
            guard busy && tries < 20 else {
                let why = String(cString: strerror(errno))
                Glibc.close(fd)
                throw StoreError.io(busy ? "\(dataDirectory) is in use by another process (a running tandemd?)" : "cannot lock \(path): \(why)")
            }
            tries += 1
            usleep(10_000)
        }
        return fd
    }

    /// The descriptor holding the data directory's lock (closed by `close`).
    private let lockFD: Int32
    private let lockOwner = NSLock()
    private var lockHeld = true  // guarded by `lockOwner`

    private init(dataDirectory: String, clusterID: ClusterID, log: WriteAheadLog, store: StateStore, limits: StoreLimits, lock: Int32) {
        lockFD = lock
        self.dataDirectory = dataDirectory
        self.clusterID = clusterID
        self.log = log
        self.store = store
        self.limits = limits
    }

    public func close() {
        log.close()
        // Idempotent: the descriptor number must never be closed twice (it may be reused).
        let fd = lockOwner.withLock { () -> Int32 in
            defer { lockHeld = false }
            return lockHeld ? lockFD : -1
        }
        if fd >= 0 { Glibc.close(fd) }
    }

    /// After a crash the database may be ahead of the log (the primary executed a write
    /// whose record never became durable) or behind it (records not yet applied, or
    /// SQLite's last transactions lost with synchronous=NORMAL). Ahead is undone; behind
    /// is left for `applyCommitted`, since only the core knows what is committed.
    private func reconcile() throws {
        if FileManager.default.fileExists(atPath: installIntentPath) {
            // A snapshot install was interrupted: finish it from the local copy.
            try finishInstall()
            return
        }
        let last = log.lastLSN
        if store.appliedLSN > last {
            openReport.append("database ahead of the log (\(store.appliedLSN) > \(last)): undoing")
            try rollbackStore(to: last)
        }
        if store.appliedLSN < log.firstLSN.previous {
            // The log no longer holds what the database needs next (SQLite lost its last
            // transactions in a power cut, with synchronous=NORMAL): only a snapshot helps.
            // The local one usually stands past the log's first record, since a prefix
            // removal keeps the segment that holds its LSN: rebuild through its LSN then.
            openReport.append("database behind the retained log: rebuilding from the local snapshot")
            let local = (try? SnapshotFormat.readHeader(path: snapshotPath).info.lsn) ?? .zero
            try rebuild(through: local <= log.lastLSN ? max(log.firstLSN.previous, local) : log.firstLSN.previous)
        }
    }

    var installIntentPath: String { snapshotDirectory + "/INSTALLING" }

    // MARK: The primary's path

    /// Executes `batch` at the next LSN in `term` and returns once its record is durable
    /// in the local log. The database changes at once, so the next write may run before
    /// this one is durable or committed (pipelining).
    public func execute(_ batch: WriteBatch, term: Term) throws -> (Execution, @Sendable () async throws -> LSN) {
        let lsn = store.appliedLSN.next
        guard log.lastLSN < lsn || log.lastLSN == store.appliedLSN else {
            throw StoreError.outOfOrder(expected: log.lastLSN.next, got: lsn)
        }
        let execution = try store.execute(batch, lsn: lsn, term: term)
        let log = self.log
        let record = execution.record
        let durable = DurableFuture()
        log.append([record]) { durable.fulfil($0) }
        return (execution, { try await durable.value() })
    }

    // MARK: Replicas' path

    /// Appends records received from the primary to the local log (not yet applied).
    public func appendReplicated(_ records: [LogRecord]) async throws {
        guard !records.isEmpty else { return }
        try await log.append(records)
    }

    /// Applies durable log records up to `lsn` (committed) to the database, in
    /// transactions of up to `batch` records (large batches amortize SQLite's per-apply statement preparation: 4096 applies about twice as fast as 512).
    public func applyCommitted(through lsn: LSN, batch: Int = 4096) throws {
        let target = min(lsn, log.lastLSN)
        store.markCommitted(through: target)
        while store.appliedLSN < target {
            let records = try log.read(from: store.appliedLSN.next, maxBytes: 4 << 20)
            let slice = records.prefix { $0.lsn <= target }.prefix(batch)
            guard !slice.isEmpty else { break }
            try store.apply(Array(slice))
        }
        store.markCommitted(through: target)
    }

    /// Drops every record after `lsn` from the log and undoes it in the database: a
    /// deposed primary's uncommitted tail, or a follower's diverged suffix.
    public func truncate(after lsn: LSN) throws {
        if store.appliedLSN > lsn { try rollbackStore(to: lsn) }
        try log.truncateSuffix(after: lsn)
    }

    private func rollbackStore(to lsn: LSN) throws {
        do {
            try store.rollback(to: lsn)
        } catch StoreError.needsRebuild(let why) {
            openReport.append("rebuild: \(why)")
            try rebuild(through: lsn)
        }
    }

    /// Rebuilds the database from the latest local snapshot (or from empty) and the log,
    /// through `lsn`.
    public func rebuild(through lsn: LSN) throws {
        if FileManager.default.fileExists(atPath: snapshotPath) {
            let (info, _) = try SnapshotFormat.readHeader(path: snapshotPath)
            if info.lsn <= lsn && log.firstLSN <= info.lsn.next {
                store = try StateStore.installSnapshot(from: snapshotPath, directory: stateDirectory, clusterID: clusterID, limits: limits)
                try applyCommitted(through: lsn)
                return
            }
        }
        guard log.firstLSN == LSN(1) else {
            throw StoreError.needsRebuild("no local snapshot covers LSN \(log.firstLSN.previous): rebuild this site from its peers")
        }
        let name = try StateStore.nextGenerationName(directory: stateDirectory)
        try StateStore.createDatabase(at: stateDirectory + "/" + name, clusterID: clusterID, appliedLSN: .zero, appliedTerm: .zero)
        try StateStore.switchGeneration(directory: stateDirectory, to: name)
        store = try StateStore.open(directory: stateDirectory, clusterID: clusterID, limits: limits)
        try applyCommitted(through: lsn)
    }

    // MARK: Snapshots

    /// Takes a local snapshot of the committed state and removes the log it covers, as
    /// `retention` allows.
    @discardableResult
    public func takeSnapshot(retention: RetentionPolicy = RetentionPolicy(), progress: ((Int, Int) -> Void)? = nil) throws -> SnapshotInfo {
        let info = try Self.writeSnapshot(store.snapshotSource, to: snapshotPath, progress: progress)
        try log.removePrefix(through: info.lsn, retention: retention)
        return info
    }

    /// Writes the local snapshot from `source` and puts it in place: `prepareSnapshot`
    /// then `placeSnapshot`, on the caller's thread.
    public static func writeSnapshot(_ source: StateStore.SnapshotSource, to snapshotPath: String,
                                     progress: ((Int, Int) -> Void)? = nil) throws -> SnapshotInfo {
        let prepared = try prepareSnapshot(source, for: snapshotPath, progress: progress)
        return try placeSnapshot(prepared, at: snapshotPath)
    }

    /// A local snapshot written next to its place and not yet in it.
    public struct PreparedSnapshot: Sendable {
        public let info: SnapshotInfo
        /// The file to rename into place; nil when the snapshot in place is already as new.
        public let scratch: String?
    }

    /// Writes a snapshot of `source` (captured on the owner's thread) to a scratch file
    /// beside `snapshotPath`, fsynced; safe to run on another thread while the site keeps
    /// going. Only the owner puts it in place (`placeSnapshot`), so that a snapshot it
    /// installs meanwhile is never replaced by this older one.
    public static func prepareSnapshot(_ source: StateStore.SnapshotSource, for snapshotPath: String,
                                       progress: ((Int, Int) -> Void)? = nil) throws -> PreparedSnapshot {
        try Durable.makeDirectory((snapshotPath as NSString).deletingLastPathComponent)
        if let existing = try? SnapshotFormat.readHeader(path: snapshotPath).info, existing.lsn >= source.committedLSN {
            return PreparedSnapshot(info: existing, scratch: nil)
        }
        let scratch = snapshotPath + ".new"
        let info = try StateStore.createSnapshot(from: source, at: scratch, progress: progress)
        return PreparedSnapshot(info: info, scratch: scratch)
    }

    /// Puts a prepared snapshot in place (rename, fsync of the directory), unless the one
    /// there is newer: an older snapshot never replaces a newer one. Returns the snapshot
    /// now in place. Owner's thread only. Then the owner calls `log.removePrefix`.
    public static func placeSnapshot(_ prepared: PreparedSnapshot, at snapshotPath: String) throws -> SnapshotInfo {
        guard let scratch = prepared.scratch else { return prepared.info }
        if let existing = try? SnapshotFormat.readHeader(path: snapshotPath).info, existing.lsn > prepared.info.lsn {
            try? FileManager.default.removeItem(atPath: scratch)
            return existing
        }
        try Durable.rename(scratch, to: snapshotPath)
        try Durable.syncDirectory((snapshotPath as NSString).deletingLastPathComponent)
        return prepared.info
    }

    /// Installs a snapshot received from a peer: the database becomes its state, and the
    /// log restarts after its LSN.
    ///
    /// The file is verified in full first (every chunk's checksum, the SHA-256, SQLite's
    /// quick_check, its metadata), by decoding it into the next database generation: a
    /// damaged, truncated or mismatched file fails there and the site keeps its database,
    /// its log and its local snapshot as they were. From the install intent on, a crash is
    /// finished by `open`: the intent names the snapshot's LSN, then the file becomes the
    /// local snapshot, the database switches to the new generation, and the log resets
    /// after the LSN. An error after the intent leaves it in place (`installInterrupted`
    /// is then true): the caller must stop and let `open` finish the install.
    public func installSnapshot(from path: String, progress: ((Int, Int) -> Void)? = nil) throws {
        let (info, _) = try SnapshotFormat.readHeader(path: path)
        guard info.clusterID == clusterID else { throw StoreError.clusterMismatch(expected: clusterID, found: info.clusterID.description) }
        try Durable.makeDirectory(snapshotDirectory)
        let generation = try StateStore.prepareGeneration(fromSnapshot: path, directory: stateDirectory, clusterID: clusterID, progress: progress)
        try crashPointInInstall?("verified")
        // The snapshot's LSN and term: a local snapshot at the same LSN from another
        // history (a diverged site) is not the one being installed.
        installInterrupted = true
        try Durable.writeFile(Array("\(info.lsn) \(info.term)\n".utf8), to: installIntentPath)
        try crashPointInInstall?("intent written")
        if path != snapshotPath {
            // Kept as the local snapshot: an interrupted install restarts from it.
            try? FileManager.default.removeItem(atPath: snapshotPath + ".tmp")
            try FileManager.default.copyItem(atPath: path, toPath: snapshotPath + ".tmp")
            try FileDescriptor(path: snapshotPath + ".tmp", flags: O_RDONLY).sync()
            try Durable.rename(snapshotPath + ".tmp", to: snapshotPath)
            try Durable.syncDirectory(snapshotDirectory)
        }
        try crashPointInInstall?("snapshot placed")
        try StateStore.switchGeneration(directory: stateDirectory, to: generation)
        try crashPointInInstall?("database switched")
        store = try StateStore.open(directory: stateDirectory, clusterID: clusterID, limits: limits)
        log.crashPointInReset = crashPointInInstall
        defer { log.crashPointInReset = nil }
        try log.reset(after: info.lsn, term: info.term)
        try crashPointInInstall?("log reset")
        try removeInstallIntent()
        installInterrupted = false
    }

    /// Tests only: called after each step of `installSnapshot` (and of its log reset);
    /// throwing stops the install there, as a crash would.
    var crashPointInInstall: ((String) throws -> Void)?

    private func removeInstallIntent() throws {
        try Durable.unlink(installIntentPath)
        try Durable.syncDirectory(snapshotDirectory)
    }

    /// Whether an install got past its intent and then failed: the database and the log
    /// may no longer agree with what the caller knows of them; only a restart (whose
    /// `open` finishes the install) may go on.
    public private(set) var installInterrupted = false

    /// Finishes an install that a crash interrupted, or abandons one that had not yet put
    /// its snapshot in place (the intent is written first): the database and the log were
    /// then still untouched.
    private func finishInstall() throws {
        let text = try String(contentsOfFile: installIntentPath, encoding: .utf8)
        let fields = text.split(whereSeparator: { $0 == " " || $0 == "\n" }).map { UInt64($0) }
        guard let first = fields.first, let lsnValue = first else {
            throw StoreError.io("\(installIntentPath): unreadable install intent \"\(text)\"")
        }
        // An intent written before terms were recorded names the LSN alone.
        let term: Term? = fields.count > 1 ? fields[1].map { Term($0) } : nil
        // A local snapshot that is missing, or names another LSN or term, is not the one
        // being installed: the crash came before it was put in place. Any other failure to
        // read it is the disk's, and stops the open rather than guessing.
        let present = FileManager.default.fileExists(atPath: snapshotPath)
        let local = present ? try SnapshotFormat.readHeader(path: snapshotPath).info : nil
        guard let info = local, info.lsn == LSN(lsnValue), term == nil || info.term == term else {
            openReport.append("abandoning a snapshot install that had not put its snapshot in place")
            try removeInstallIntent()
            try reconcile()
            return
        }
        openReport.append("finishing an interrupted snapshot install")
        let undo = try store.undoDepth()
        // The same LSN and term is the same committed history (log matching); the same
        // LSN in another term is a diverged database, installed over.
        if store.appliedLSN != info.lsn || store.appliedTerm != info.term || undo != 0 {
            store = try StateStore.installSnapshot(from: snapshotPath, directory: stateDirectory, clusterID: clusterID, limits: limits)
        }
        try log.reset(after: info.lsn, term: info.term)
        try removeInstallIntent()
    }
}

/// A one-shot result that an async caller can wait for, fulfilled from any thread.
final class DurableFuture: @unchecked Sendable {
    // Guarded by `lock`.
    private let lock = NSLock()
    private var result: Result<LSN, WALError>?
    private var waiter: CheckedContinuation<LSN, any Error>?

    func fulfil(_ r: Result<LSN, WALError>) {
        lock.lock()
        if let waiter {
            self.waiter = nil
            lock.unlock()
            waiter.resume(with: r.mapError { $0 as any Error })
            return
        }
        result = r
        lock.unlock()
    }

    func value() async throws -> LSN {
        try await withCheckedThrowingContinuation { c in
            lock.lock()
            if let result {
                lock.unlock()
                c.resume(with: result.mapError { $0 as any Error })
                return
            }
            waiter = c
            lock.unlock()
        }
    }
}
