import TandemModel

/// The on-disk layout of log segments. All integers are little-endian.
///
/// Segment file `<first LSN as 16 hex digits>.wal`:
///
///     header (64 bytes)
///       0  magic "TANDEMWL"            8
///       8  format version (1)          u32
///      12  header size (64)            u32
///      16  cluster id                  16
///      32  first LSN                   u64
///      40  term of the record before   u64   (log matching across a removed prefix)
///      48  flags (bit 0: reset — the log restarts here after a snapshot)  u32
///      52  reserved, zero              8
///      60  CRC32C of bytes 0..<60      u32
///     batch, batch, ... then zeros (the segment is preallocated)
///
/// A batch is what one fdatasync covers. The next batch is written only after the
/// previous one's fsync succeeded, so only the last batch of the last segment can be torn.
///
///     batch header (32 bytes)
///       0  magic 0x54424154 ("TBAT")   u32
///       4  body length                 u32
///       8  record count                u32
///      12  previous batch's body CRC   u32   (the segment header's CRC for the first)
///      16  first LSN                   u64
///      24  CRC32C of the body          u32
///      28  CRC32C of bytes 0..<28      u32
///     body: records back to back
///
///     record header (28 bytes), then the payload
///       0  payload length              u32
///       4  CRC32C of bytes 8..<28+len  u32
///       8  term                        u64
///      16  LSN                         u64
///      24  kind                        u8
///      25  reserved, zero              3
enum WALFormat {
    static let segmentMagic: [UInt8] = Array("TANDEMWL".utf8)
    static let version: UInt32 = 1
    static let segmentHeaderSize = 64
    static let batchMagic: UInt32 = 0x5442_4154
    static let batchHeaderSize = 32
    static let recordHeaderSize = 28

    static func segmentFileName(firstLSN: LSN) -> String {
        let hex = String(firstLSN.rawValue, radix: 16)
        return String(repeating: "0", count: max(0, 16 - hex.count)) + hex + ".wal"
    }

    static func parseSegmentFileName(_ name: String) -> LSN? {
        guard name.hasSuffix(".wal"), name.count == 20 else { return nil }
        return UInt64(name.prefix(16), radix: 16).map { LSN($0) }
    }

    struct SegmentHeader: Equatable {
        var clusterID: ClusterID
        var firstLSN: LSN
        var previousTerm: Term
        var isReset = false
        var crc: UInt32 = 0
    }

    static func encodeSegmentHeader(_ h: SegmentHeader) -> (bytes: [UInt8], crc: UInt32) {
        var w = ByteWriter(capacity: segmentHeaderSize)
        w.raw(segmentMagic)
        w.u32(version)
        w.u32(UInt32(segmentHeaderSize))
        w.raw(h.clusterID.bytes)
        w.u64(h.firstLSN.rawValue)
        w.u64(h.previousTerm.rawValue)
        w.u32(h.isReset ? 1 : 0)
        w.zeros(8)
        let crc = CRC32C.checksum(w.bytes)
        w.u32(crc)
        return (w.bytes, crc)
    }

    enum HeaderProblem: Error { case message(String) }

    static func decodeSegmentHeader(_ bytes: [UInt8]) throws(HeaderProblem) -> SegmentHeader {
        guard bytes.count >= segmentHeaderSize else {
            throw .message("segment header truncated: \(bytes.count) of \(segmentHeaderSize) bytes")
        }
        guard Array(bytes[0..<8]) == segmentMagic else { throw .message("not a Tandem log segment (bad magic)") }
        let stored = bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 60, as: UInt32.self)) }
        let computed = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<60])) }
        guard stored == computed else { throw .message("segment header checksum mismatch") }
        var r = ByteReader(bytes, offset: 8)
        do {
            let v = try r.u32()
            guard v == version else { throw HeaderProblem.message("unknown log format version \(v) (this build reads \(version))") }
            _ = try r.u32()
            guard let cid = ClusterID(bytes: try r.raw(16)) else { throw HeaderProblem.message("bad cluster id") }
            let first = LSN(try r.u64())
            let prevTerm = Term(try r.u64())
            let flags = try r.u32()
            return SegmentHeader(clusterID: cid, firstLSN: first, previousTerm: prevTerm, isReset: flags & 1 != 0, crc: stored)
        } catch let e as HeaderProblem {
            throw e
        } catch {
            throw .message("segment header unreadable: \(error)")
        }
    }

    /// Encodes `records` as one batch chained to `previousCRC`. Returns the bytes and the
    /// body CRC, which the next batch chains to.
    static func encodeBatch(_ records: ArraySlice<LogRecord>, previousCRC: UInt32) -> (bytes: [UInt8], bodyCRC: UInt32) {
        var bodyBytes = 0
        for r in records { bodyBytes += recordHeaderSize + r.payload.count }
        return encodeBatch(recordCount: records.count, bodyBytes: bodyBytes, firstLSN: records.first?.lsn ?? .zero,
                           previousCRC: previousCRC) { buf, offset in
            for r in records { storeRecord(r, into: buf, at: &offset) }
        }
    }

    /// Encodes a batch of `recordCount` records taking `bodyBytes` (headers included),
    /// which `storeRecords` stores with `storeRecord` from the offset it is given. The log's
    /// writer stores its appends' records this way without gathering them into one array
    /// first (a copy and a retain of every payload, per batch).
    static func encodeBatch(recordCount: Int, bodyBytes: Int, firstLSN: LSN, previousCRC: UInt32,
                            storeRecords: (UnsafeMutableRawBufferPointer, inout Int) -> Void) -> (bytes: [UInt8], bodyCRC: UInt32) {
        let size = batchHeaderSize + bodyBytes
        var bodyCRC: UInt32 = 0
        // Every byte is stored (headers with their reserved bytes, payloads, CRCs): no
        // zeroing first. A mismatch with `bodyBytes` would leave bytes unset: refused below.
        let out = [UInt8](unsafeUninitializedCapacity: size) { raw, initialized in
            let buf = UnsafeMutableRawBufferPointer(raw)
            var off = batchHeaderSize
            storeRecords(buf, &off)
            precondition(off == size, "a batch's records took \(off - batchHeaderSize) bytes, not the \(bodyBytes) counted")
            let body = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: buf[batchHeaderSize..<size]))
            buf.storeBytes(of: batchMagic.littleEndian, toByteOffset: 0, as: UInt32.self)
            buf.storeBytes(of: UInt32(bodyBytes).littleEndian, toByteOffset: 4, as: UInt32.self)
            buf.storeBytes(of: UInt32(recordCount).littleEndian, toByteOffset: 8, as: UInt32.self)
            buf.storeBytes(of: previousCRC.littleEndian, toByteOffset: 12, as: UInt32.self)
            buf.storeBytes(of: firstLSN.rawValue.littleEndian, toByteOffset: 16, as: UInt64.self)
            buf.storeBytes(of: body.littleEndian, toByteOffset: 24, as: UInt32.self)
            let hcrc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: buf[0..<28]))
            buf.storeBytes(of: hcrc.littleEndian, toByteOffset: 28, as: UInt32.self)
            bodyCRC = body
            initialized = size
        }
        return (out, bodyCRC)
    }

    /// Stores one record (header, payload, its CRC) at `offset` and moves past it.
    @inline(__always)
    static func storeRecord(_ r: LogRecord, into buf: UnsafeMutableRawBufferPointer, at offset: inout Int) {
        let start = offset
        // Release builds do not bounds-check raw stores: a miscounted batch must stop here,
        // before it writes past the buffer.
        precondition(start + recordHeaderSize + r.payload.count <= buf.count, "record \(r.lsn) overruns its batch's buffer")
        buf.storeBytes(of: UInt32(r.payload.count).littleEndian, toByteOffset: start, as: UInt32.self)
        buf.storeBytes(of: r.term.rawValue.littleEndian, toByteOffset: start + 8, as: UInt64.self)
        buf.storeBytes(of: r.lsn.rawValue.littleEndian, toByteOffset: start + 16, as: UInt64.self)
        // The kind and the three reserved zero bytes after it, in one store.
        buf.storeBytes(of: UInt32(r.kind.rawValue).littleEndian, toByteOffset: start + 24, as: UInt32.self)
        var end = start + recordHeaderSize
        if !r.payload.isEmpty {
            r.payload.withUnsafeBytes { p in
                UnsafeMutableRawBufferPointer(rebasing: buf[end..<(end + p.count)]).copyMemory(from: p)
            }
            end += r.payload.count
        }
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: buf[(start + 8)..<end]))
        buf.storeBytes(of: crc.littleEndian, toByteOffset: start + 4, as: UInt32.self)
        offset = end
    }

    struct BatchHeader {
        var bodyLength: Int
        var count: Int
        var previousCRC: UInt32
        var firstLSN: LSN
        var bodyCRC: UInt32
    }

    /// Decodes a batch header at `offset` of `buf`; nil if it is not a valid header.
    static func decodeBatchHeader(_ buf: UnsafeRawBufferPointer, at offset: Int) -> BatchHeader? {
        guard offset + batchHeaderSize <= buf.count else { return nil }
        func u32(_ o: Int) -> UInt32 { UInt32(littleEndian: buf.loadUnaligned(fromByteOffset: offset + o, as: UInt32.self)) }
        guard u32(0) == batchMagic else { return nil }
        let hcrc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: buf[offset..<(offset + 28)]))
        guard hcrc == u32(28) else { return nil }
        let first = UInt64(littleEndian: buf.loadUnaligned(fromByteOffset: offset + 16, as: UInt64.self))
        return BatchHeader(bodyLength: Int(u32(4)), count: Int(u32(8)), previousCRC: u32(12), firstLSN: LSN(first), bodyCRC: u32(24))
    }

    /// Decodes one record at `offset` of `buf`, checking its CRC when asked.
    static func decodeRecord(_ buf: UnsafeRawBufferPointer, at offset: Int, end: Int, verify: Bool) -> (LogRecord, Int)? {
        guard offset + recordHeaderSize <= end else { return nil }
        let len = Int(UInt32(littleEndian: buf.loadUnaligned(fromByteOffset: offset, as: UInt32.self)))
        let next = offset + recordHeaderSize + len
        guard next <= end else { return nil }
        if verify {
            let stored = UInt32(littleEndian: buf.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self))
            guard CRC32C.checksum(UnsafeRawBufferPointer(rebasing: buf[(offset + 8)..<next])) == stored else { return nil }
        }
        let term = UInt64(littleEndian: buf.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self))
        let lsn = UInt64(littleEndian: buf.loadUnaligned(fromByteOffset: offset + 16, as: UInt64.self))
        guard let kind = RecordKind(rawValue: buf[offset + 24]) else { return nil }
        let payload = [UInt8](UnsafeRawBufferPointer(rebasing: buf[(offset + recordHeaderSize)..<next]))
        return (LogRecord(term: Term(term), lsn: LSN(lsn), kind: kind, payload: payload), next)
    }
}
