import CLZ4
import CSQLite
import Foundation
import TandemModel

/// What a snapshot file holds.
public struct SnapshotInfo: Sendable, Hashable {
    public var clusterID: ClusterID
    /// The applied LSN of the state it holds, and that record's term.
    public var lsn: LSN
    public var term: Term
    /// Size of the database it restores to, and of the file.
    public var rawBytes: Int
    public var fileBytes: Int
    /// SHA-256 of the database bytes.
    public var sha256: String
}

/// A snapshot file: a consistent copy of the database at a committed LSN, compressed in
/// independent LZ4 chunks, each with its own checksum (so a transfer can resume at a
/// chunk boundary), and a trailer with the SHA-256 of the whole database.
///
///     header (64 bytes)
///       0  magic "TANDEMSS"         8
///       8  format version (1)       u32
///      12  header size (64)         u32
///      16  cluster id               16
///      32  LSN                      u64
///      40  term                     u64
///      48  database size            u64
///      56  chunk size               u32
///      60  CRC32C of bytes 0..<60   u32
///     chunks
///       raw length u32 | stored length u32 (bit 31: stored uncompressed) | CRC32C of the stored bytes u32 | bytes
///     trailer (52 bytes)
///       magic "TSSNAPND" 8 | chunk count u64 | SHA-256 of the database 32 | CRC32C of the previous 48 bytes u32
public enum SnapshotFormat {
    static let magic: [UInt8] = Array("TANDEMSS".utf8)
    static let trailerMagic: [UInt8] = Array("TSSNAPND".utf8)
    static let version: UInt32 = 1
    static let headerSize = 64
    static let trailerSize = 52
    public static let chunkSize = 1 << 20
    static let uncompressedFlag: UInt32 = 1 << 31

    static func encodeHeader(_ info: SnapshotInfo, chunkSize: Int) -> [UInt8] {
        var w = ByteWriter(capacity: headerSize)
        w.raw(magic)
        w.u32(version)
        w.u32(UInt32(headerSize))
        w.raw(info.clusterID.bytes)
        w.u64(info.lsn.rawValue)
        w.u64(info.term.rawValue)
        w.u64(UInt64(info.rawBytes))
        w.u32(UInt32(chunkSize))
        w.u32(CRC32C.checksum(w.bytes))
        return w.bytes
    }

    /// Reads and checks a snapshot's header.
    public static func readHeader(path: String) throws(StoreError) -> (info: SnapshotInfo, chunkSize: Int) {
        let fd: FileDescriptor
        let bytes: [UInt8]
        let size: Int
        do {
            fd = try FileDescriptor(path: path, flags: O_RDONLY)
            bytes = try fd.read(count: headerSize, at: 0)
            size = try fd.size()
        } catch { throw .snapshot("\(error)") }
        return try decodeHeader(bytes, fileBytes: size, path: path)
    }

    public static func decodeHeader(_ bytes: [UInt8], fileBytes: Int, path: String) throws(StoreError) -> (info: SnapshotInfo, chunkSize: Int) {
        guard bytes.count == headerSize else { throw .snapshot("\(path): header truncated (\(bytes.count) of \(headerSize) bytes)") }
        guard Array(bytes[0..<8]) == magic else { throw .snapshot("\(path): not a Tandem snapshot (bad magic)") }
        let crc = CRC32C.checksum(Array(bytes[0..<60]))
        var r = ByteReader(bytes, offset: 8)
        do {
            let v = try r.u32()
            guard v == version else { throw StoreError.snapshot("\(path): unknown snapshot format version \(v)") }
            _ = try r.u32()
            guard let cid = ClusterID(bytes: try r.raw(16)) else { throw StoreError.snapshot("\(path): bad cluster id") }
            let lsnValue = try r.u64()
            let termValue = try r.u64()
            let rawValue = try r.u64()
            let chunk = Int(try r.u32())
            let stored = try r.u32()
            guard stored == crc else { throw StoreError.snapshot("\(path): header checksum mismatch") }
            guard chunk > 0, chunk <= 64 << 20 else { throw StoreError.snapshot("\(path): chunk size \(chunk) out of range") }
            // A peer's header must not trap a conversion: LSN and term are stored in SQLite
            // as signed 64-bit integers, the size is an Int.
            guard lsnValue <= UInt64(Int64.max), termValue <= UInt64(Int64.max), let raw = Int(exactly: rawValue) else {
                throw StoreError.snapshot("\(path): LSN \(lsnValue), term \(termValue) or size \(rawValue) out of range")
            }
            let lsn = LSN(lsnValue), term = Term(termValue)
            return (SnapshotInfo(clusterID: cid, lsn: lsn, term: term, rawBytes: raw, fileBytes: fileBytes, sha256: ""), chunk)
        } catch let e as StoreError {
            throw e
        } catch {
            throw .snapshot("\(path): \(error)")
        }
    }
}

extension StateStore {
    /// Writes a snapshot of the committed state (speculative records undone in the copy)
    /// to `path`, crash-safely: temporary file, fsync, rename, fsync of the directory.
    /// `progress` gets (bytes done, bytes total) of the database as it is compressed.
    /// What a snapshot taken on another thread needs to know of this store, captured on
    /// the owner's thread.
    public struct SnapshotSource: Sendable {
        public let databasePath: String
        public let directory: String
        public let clusterID: ClusterID
        public let limits: StoreLimits
        public let committedLSN: LSN
    }

    public var snapshotSource: SnapshotSource {
        SnapshotSource(databasePath: databasePath, directory: directory, clusterID: clusterID, limits: limits, committedLSN: committedLSN)
    }

    /// Writes a snapshot of the committed state (speculative records undone in the copy)
    /// to `path`, crash-safely: temporary file, fsync, rename, fsync of the directory.
    /// `progress` gets (bytes done, bytes total) of the database as it is compressed.
    @discardableResult
    public func createSnapshot(at path: String, progress: ((Int, Int) -> Void)? = nil) throws(StoreError) -> SnapshotInfo {
        try Self.createSnapshot(from: snapshotSource, at: path, progress: progress)
    }

    /// The same, from any thread: it reads the database through a connection of its own
    /// (SQLite's WAL mode lets it read a consistent state while the owner keeps writing).
    public static func createSnapshot(from source: SnapshotSource, at path: String,
                                      progress: ((Int, Int) -> Void)? = nil) throws(StoreError) -> SnapshotInfo {
        let scratch = source.directory + "/snapshot-scratch-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let copyName = generationName(1)
        do {
            try Durable.makeDirectory(scratch)
            let reader = try SQLiteConnection(path: source.databasePath, create: false)
            try reader.exec("PRAGMA busy_timeout = 10000")
            // A consistent copy under one read transaction.
            _ = try reader.rows("VACUUM INTO ?", [.text(scratch + "/" + copyName)])
            try Durable.writeFile(Array((copyName + "\n").utf8), to: scratch + "/" + currentFile)
        } catch { throw storeError(error) }
        let copy = try StateStore.open(directory: scratch, clusterID: source.clusterID, limits: source.limits)
        // The undo journal is a contiguous suffix of speculative records: keep what was
        // committed when the snapshot was asked for, undo the rest.
        let target = min(copy.appliedLSN, max(copy.committedLSN, source.committedLSN))
        copy.committedLSN = target
        do {
            try copy.rollback(to: target)
        } catch {
            throw .snapshot("cannot snapshot while a schema change is uncommitted; retry once it commits (\(error))")
        }
        do {
            _ = try copy.db.rows("DELETE FROM tandem_undo")
            try copy.db.exec("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode = DELETE")
        } catch { throw storeError(error) }
        let info = SnapshotInfo(clusterID: source.clusterID, lsn: copy.appliedLSN, term: copy.appliedTerm, rawBytes: 0, fileBytes: 0, sha256: "")
        return try writeSnapshot(database: copy.databasePath, info: info, to: path, progress: progress)
    }

    static func writeSnapshot(database: String, info: SnapshotInfo, to path: String, progress: ((Int, Int) -> Void)?) throws(StoreError) -> SnapshotInfo {
        let tmp = path + ".tmp"
        do {
            let input = try FileDescriptor(path: database, flags: O_RDONLY)
            let total = try input.size()
            var info = info
            info.rawBytes = total
            let out = try FileDescriptor(path: tmp, flags: O_WRONLY | O_CREAT | O_TRUNC)
            var offset = 0
            try out.write(SnapshotFormat.encodeHeader(info, chunkSize: SnapshotFormat.chunkSize), at: 0)
            offset = SnapshotFormat.headerSize
            var hasher = SHA256Hasher()
            let bound = Int(LZ4_compressBound(Int32(SnapshotFormat.chunkSize)))
            var compressed = [UInt8](repeating: 0, count: bound)
            var raw = [UInt8](repeating: 0, count: SnapshotFormat.chunkSize)
            var done = 0
            var chunks: UInt64 = 0
            while done < total {
                let n = try raw.withUnsafeMutableBytes { try input.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<min($0.count, total - done)]), at: done) }
                guard n > 0 else { throw StoreError.snapshot("\(database) shrank while being read") }
                raw.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                let c = raw.withUnsafeBytes { src in
                    compressed.withUnsafeMutableBytes { dst in
                        LZ4_compress_default(src.baseAddress!.assumingMemoryBound(to: CChar.self),
                                             dst.baseAddress!.assumingMemoryBound(to: CChar.self), Int32(n), Int32(bound))
                    }
                }
                var w = ByteWriter(capacity: 12 + n)
                w.u32(UInt32(n))
                if c > 0 && Int(c) < n {
                    let stored = Array(compressed[0..<Int(c)])
                    w.u32(UInt32(c))
                    w.u32(CRC32C.checksum(stored))
                    w.raw(stored)
                } else {
                    let stored = Array(raw[0..<n])
                    w.u32(UInt32(n) | SnapshotFormat.uncompressedFlag)
                    w.u32(CRC32C.checksum(stored))
                    w.raw(stored)
                }
                try out.write(w.bytes, at: offset)
                offset += w.count
                done += n
                chunks += 1
                progress?(done, total)
            }
            let digest = hasher.finish()
            var t = ByteWriter(capacity: SnapshotFormat.trailerSize)
            t.raw(SnapshotFormat.trailerMagic)
            t.u64(chunks)
            t.raw(digest)
            t.u32(CRC32C.checksum(t.bytes))
            try out.write(t.bytes, at: offset)
            offset += t.count
            try out.sync()
            try Durable.rename(tmp, to: path)
            try Durable.syncDirectory((path as NSString).deletingLastPathComponent)
            info.fileBytes = offset
            info.sha256 = SHA256Hasher.hex(digest)
            return info
        } catch {
            try? Durable.unlink(tmp)
            throw storeError(error)
        }
    }

    /// Installs the snapshot at `path` as the state database of `directory`, replacing
    /// what was there, and opens it. Every chunk's checksum and the database's SHA-256
    /// are verified before anything is replaced; the switch itself is one atomic rename
    /// of the CURRENT pointer. The previous store of `directory` must not be used again.
    public static func installSnapshot(from path: String, directory: String, clusterID: ClusterID,
                                       limits: StoreLimits = StoreLimits(),
                                       progress: ((Int, Int) -> Void)? = nil) throws(StoreError) -> StateStore {
        let name = try prepareGeneration(fromSnapshot: path, directory: directory, clusterID: clusterID, progress: progress)
        try switchGeneration(directory: directory, to: name)
        return try open(directory: directory, clusterID: clusterID, limits: limits)
    }

    /// Decodes the snapshot at `path` into a new database generation of `directory` and
    /// verifies it (every chunk's checksum, the SHA-256, SQLite's quick_check, and that its
    /// metadata is the header's committed state), without switching to it: returns the
    /// generation's name for `switchGeneration`. Nothing else in `directory` changes, and
    /// a snapshot that fails leaves no file behind, so a caller can verify a peer's file
    /// before it gives up anything it holds.
    static func prepareGeneration(fromSnapshot path: String, directory: String, clusterID: ClusterID,
                                  progress: ((Int, Int) -> Void)? = nil) throws(StoreError) -> String {
        let (header, chunkSize) = try SnapshotFormat.readHeader(path: path)
        guard header.clusterID == clusterID else { throw .clusterMismatch(expected: clusterID, found: header.clusterID.description) }
        let name = try nextGenerationName(directory: directory)
        let partial = directory + "/" + name + ".partial"
        do {
            try Durable.makeDirectory(directory)
            let input = try FileDescriptor(path: path, flags: O_RDONLY)
            let fileSize = try input.size()
            let out = try FileDescriptor(path: partial, flags: O_WRONLY | O_CREAT | O_TRUNC)
            var hasher = SHA256Hasher()
            var offset = SnapshotFormat.headerSize
            var written = 0
            var chunks: UInt64 = 0
            let bound = Int(LZ4_compressBound(Int32(chunkSize)))
            var raw = [UInt8](repeating: 0, count: chunkSize)
            while written < header.rawBytes {
                let ch = try input.read(count: 12, at: offset)
                guard ch.count == 12 else { throw StoreError.snapshot("\(path): truncated at chunk \(chunks) (byte \(offset))") }
                var r = ByteReader(ch)
                let rawLen = Int(try r.u32())
                let storedField = try r.u32()
                let crc = try r.u32()
                let uncompressed = storedField & SnapshotFormat.uncompressedFlag != 0
                let storedLen = Int(storedField & ~SnapshotFormat.uncompressedFlag)
                guard rawLen > 0, rawLen <= chunkSize, storedLen <= bound, written + rawLen <= header.rawBytes,
                      !uncompressed || storedLen == rawLen
                else { throw StoreError.snapshot("\(path): chunk \(chunks) at byte \(offset) has impossible lengths") }
                let stored = try input.read(count: storedLen, at: offset + 12)
                guard stored.count == storedLen else { throw StoreError.snapshot("\(path): truncated in chunk \(chunks)") }
                guard CRC32C.checksum(stored) == crc else { throw StoreError.snapshot("\(path): chunk \(chunks) at byte \(offset) fails its checksum") }
                if uncompressed {
                    try out.write(stored, at: written)
                    hasher.update(stored)
                } else {
                    let n = stored.withUnsafeBytes { src in
                        raw.withUnsafeMutableBytes { dst in
                            LZ4_decompress_safe(src.baseAddress!.assumingMemoryBound(to: CChar.self),
                                                dst.baseAddress!.assumingMemoryBound(to: CChar.self), Int32(storedLen), Int32(rawLen))
                        }
                    }
                    guard Int(n) == rawLen else { throw StoreError.snapshot("\(path): chunk \(chunks) does not decompress to its stated size") }
                    try raw.withUnsafeBytes { try out.write(UnsafeRawBufferPointer(rebasing: $0[0..<rawLen]), at: written) }
                    raw.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<rawLen])) }
                }
                offset += 12 + storedLen
                written += rawLen
                chunks += 1
                progress?(written, header.rawBytes)
            }
            let trailer = try input.read(count: SnapshotFormat.trailerSize, at: offset)
            guard trailer.count == SnapshotFormat.trailerSize, offset + SnapshotFormat.trailerSize == fileSize else {
                throw StoreError.snapshot("\(path): trailer missing or followed by extra bytes")
            }
            var t = ByteReader(trailer)
            guard try t.raw(8) == SnapshotFormat.trailerMagic, try t.u64() == chunks else {
                throw StoreError.snapshot("\(path): trailer does not match the chunks read")
            }
            let digest = try t.raw(32)
            guard try t.u32() == CRC32C.checksum(Array(trailer[0..<48])) else { throw StoreError.snapshot("\(path): trailer checksum mismatch") }
            guard hasher.finish() == digest else { throw StoreError.snapshot("\(path): the database's SHA-256 does not match the trailer") }
            try out.sync()
            try Durable.rename(partial, to: directory + "/" + name)
            try Durable.syncDirectory(directory)
        } catch {
            try? Durable.unlink(partial)
            throw storeError(error)
        }
        // Check it opens as the state it claims before switching to it.
        do {
            let check = try SQLiteConnection(path: directory + "/" + name, create: false)
            let ok = try check.rows("PRAGMA quick_check")
            guard ok.first?.first == .text("ok") else { throw StoreError.snapshot("\(path): the database fails SQLite's quick_check") }
            let meta = try check.rows("SELECT cluster_id, applied_lsn, applied_term FROM tandem_meta WHERE id = 1")
            guard meta.first == [.text(clusterID.description), .integer(Int64(header.lsn.rawValue)), .integer(Int64(header.term.rawValue))] else {
                throw StoreError.snapshot("\(path): the database's metadata does not match the header (LSN \(header.lsn), term \(header.term))")
            }
            // A snapshot holds committed state only: nothing in it may be undone.
            guard try check.rows("SELECT count(*) FROM tandem_undo").first == [.integer(0)] else {
                throw StoreError.snapshot("\(path): the database holds records to undo; a snapshot holds committed state only")
            }
        } catch {
            try? Durable.unlink(directory + "/" + name)
            throw storeError(error)
        }
        return name
    }
}
