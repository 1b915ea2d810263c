import CLZ4
import TandemCore
import TandemModel

/// The peer wire format: length-prefixed, versioned frames over TLS. docs/WIRE.md is the
/// specification; this file is its implementation.
///
///     frame   = length u32 (bytes after this field) | type u8 | body
///     hello   = magic "TNDM" | version u16 | cluster id (16) | site id (u16 len + UTF-8) | features u32
///               | peer timeout ms u32 (only with the keepalive feature bit)
///     message = from, to (u16 len + UTF-8) | term u64 | kind u8 | kind-specific fields
///     records = count u32 | encoding u8 (0 plain, 1 LZ4 block, 2 LZ4 chunks) | raw length u32 | encoding's fields
///               where the raw bytes are, per record: term u64 | lsn u64 | kind u8 | payload (u32 len + bytes)
public enum Wire {
    public static let magic: [UInt8] = Array("TNDM".utf8)
    public static let protocolVersion: UInt16 = 1
    /// Feature bits negotiated in the hello: both sides must set a bit for it to be used.
    public static let featureLZ4: UInt32 = 1 << 0
    /// Keepalive: each side sends a ping when it has sent nothing for a while, and closes
    /// a connection on which nothing arrived for the peer timeout (a silent partition, a
    /// paused process: TCP alone would keep such a connection for many minutes).
    public static let featureKeepalive: UInt32 = 1 << 1
    /// LZ4 record blocks in independent 64 KiB chunks (encoding 2), used instead of one
    /// LZ4 block (encoding 1) when both sides set it: LZ4 compresses an input under 64 KiB
    /// with a hash table of 16-bit entries that stays in the CPU's cache: on the telehealth
    /// log the encoder ran 7–19% faster than with one megabyte block, for a ratio 1.5%
    /// lower (docs/WIRE.md).
    public static let featureLZ4Chunks: UInt32 = 1 << 2
    /// Shortest peer timeout a site may announce or use.
    public static let minimumPeerTimeoutMilliseconds: UInt32 = 300

    public enum FrameType: UInt8, Sendable {
        case hello = 1
        case message = 2
        case goodbye = 3
        case snapshot = 4
        case forward = 5
        /// Empty body; sent only when both sides announced `featureKeepalive`.
        case ping = 6
    }

    /// Largest snapshot chunk sent in one frame.
    public static let snapshotChunkBytes = 1 << 20

    /// Record blocks at least this large are compressed when LZ4 is negotiated.
    public static let compressionThreshold = 512

    /// Raw bytes per chunk of an encoding-2 record block (under the 64 KB up to which
    /// LZ4 uses its faster table of 16-bit entries).
    public static let lz4ChunkBytes = 64 << 10
    /// The chunk sizes a decoder accepts: bounds the chunks per block (64 MiB ÷ 1 KiB).
    public static let lz4ChunkBytesRange = 1024...(4 << 20)
    /// The most an LZ4 block can expand (a long match costs one byte per 255 it
    /// repeats), rounded up: a stated size beyond this is refused unallocated.
    static let lz4MaxExpansion = 256
}

/// How record blocks are compressed on a connection: what both hellos announced.
public enum RecordCompression: String, Sendable, Hashable {
    case none
    /// One LZ4 block per record block (encoding 1; peers without `featureLZ4Chunks`).
    case lz4Block = "lz4"
    /// Independent LZ4 chunks (encoding 2).
    case lz4Chunks = "lz4_chunks"

    /// What a connection uses given this side's wish and the peer's features.
    public static func negotiated(compress: Bool, chunks: Bool, peerFeatures: UInt32) -> RecordCompression {
        guard compress, peerFeatures & Wire.featureLZ4 != 0 else { return .none }
        return chunks && peerFeatures & Wire.featureLZ4Chunks != 0 ? .lz4Chunks : .lz4Block
    }
}

/// What one side announces after the TLS handshake.
public struct Hello: Hashable, Sendable {
    public var version: UInt16
    public var clusterID: ClusterID
    public var siteID: SiteID
    public var features: UInt32
    /// With `featureKeepalive`: the sender's peer timeout. The pair pings after a sixth of
    /// the shorter and closes after the longer of the two, so sites configured apart
    /// (during a rolling change) do not drop each other's connections.
    public var peerTimeoutMilliseconds: UInt32

    public init(version: UInt16 = Wire.protocolVersion, clusterID: ClusterID, siteID: SiteID, features: UInt32,
                peerTimeoutMilliseconds: UInt32 = 0) {
        self.version = version
        self.clusterID = clusterID
        self.siteID = siteID
        self.peerTimeoutMilliseconds = features & Wire.featureKeepalive != 0 ? peerTimeoutMilliseconds : 0
        self.features = features
    }
}

/// A frame that does not follow the format: the connection is closed with this reason.
public struct WireError: Error, Hashable, Sendable, CustomStringConvertible {
    public let reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// Counters of bytes moved, for the compression-ratio metric.
public struct WireStatistics: Sendable {
    public var recordBytesRaw = 0
    public var recordBytesSent = 0
    public var compressionRatio: Double { recordBytesSent == 0 ? 1 : Double(recordBytesRaw) / Double(recordBytesSent) }
}

/// Snapshot transfer, resumable: the sender offers a snapshot, the receiver asks for it
/// from an offset (the size of what it already holds of the same snapshot), the sender
/// streams checksummed chunks from there.
public enum SnapshotFrame: Hashable, Sendable {
    /// kind 1: lsn u64, term u64, size u64
    case offer(lsn: LSN, term: Term, size: UInt64)
    /// kind 2: lsn u64, offset u64
    case request(lsn: LSN, offset: UInt64)
    /// kind 3: lsn u64, offset u64, CRC32C of bytes u32, bytes (u32 length + bytes)
    case chunk(lsn: LSN, offset: UInt64, bytes: [UInt8])

    public func encode() -> [UInt8] {
        var w = ByteWriter(capacity: 64)
        switch self {
        case let .offer(lsn, term, size): w.u8(1); w.u64(lsn.rawValue); w.u64(term.rawValue); w.u64(size)
        case let .request(lsn, offset): w.u8(2); w.u64(lsn.rawValue); w.u64(offset)
        case let .chunk(lsn, offset, bytes):
            w.u8(3); w.u64(lsn.rawValue); w.u64(offset); w.u32(CRC32C.checksum(bytes)); w.blob(bytes)
        }
        return WireEncoder.frame(.snapshot, w.bytes)
    }

    public static func decode(_ body: [UInt8]) throws(WireError) -> SnapshotFrame {
        var r = ByteReader(body)
        do {
            let kind = try r.u8("snapshot frame kind")
            let f: SnapshotFrame
            switch kind {
            case 1: f = .offer(lsn: LSN(try r.u64()), term: Term(try r.u64()), size: try r.u64())
            case 2: f = .request(lsn: LSN(try r.u64()), offset: try r.u64())
            case 3:
                let lsn = LSN(try r.u64()), offset = try r.u64(), crc = try r.u32()
                let bytes = try r.blob("snapshot chunk", limit: Wire.snapshotChunkBytes)
                guard CRC32C.checksum(bytes) == crc else { throw WireError("snapshot chunk at offset \(offset) fails its checksum") }
                f = .chunk(lsn: lsn, offset: offset, bytes: bytes)
            default: throw WireError("unknown snapshot frame kind \(kind)")
            }
            guard r.isAtEnd else { throw WireError("\(r.remaining) trailing bytes in a snapshot frame") }
            return f
        } catch let e as WireError {
            throw e
        } catch {
            throw WireError("malformed snapshot frame: \(error)")
        }
    }
}

/// An API call a site forwards to the primary over the peer link (writes and
/// linearizable reads reach the primary this way, never in clear between sites), and its
/// answer. The body is the HTTP request's, already authenticated by the forwarding site.
public enum ForwardFrame: Hashable, Sendable {
    /// kind 1: id u64 | deadline in ms u32 | method, path, query, content type (u32 len + UTF-8
    /// each) | headers u16 count, (name, value) strings | body (u32 length + bytes)
    case request(id: UInt64, call: ForwardedCall)
    /// kind 2: id u64 | status u16 | headers u16 count, (name, value) strings | body (u32 length + bytes)
    case response(id: UInt64, answer: ForwardedAnswer)

    public func encode() -> [UInt8] {
        var w = ByteWriter(capacity: 128)
        func headers(_ h: [(String, String)]) {
            w.u16(UInt16(min(h.count, Int(UInt16.max))))
            for (n, v) in h.prefix(Int(UInt16.max)) { w.string(n); w.string(v) }
        }
        switch self {
        case let .request(id, c):
            w.u8(1); w.u64(id); w.u32(c.deadlineMilliseconds)
            w.string(c.method); w.string(c.path); w.string(c.query); w.string(c.contentType)
            headers(c.headers.map { ($0.name, $0.value) })
            w.blob(c.body)
        case let .response(id, a):
            w.u8(2); w.u64(id); w.u16(a.status)
            headers(a.headers.map { ($0.name, $0.value) })
            w.blob(a.body)
        }
        return WireEncoder.frame(.forward, w.bytes)
    }

    public static func decode(_ body: [UInt8]) throws(WireError) -> ForwardFrame {
        var r = ByteReader(body)
        do {
            func headers() throws -> [ForwardedHeader] {
                let n = Int(try r.u16("header count"))
                guard n <= 64 else { throw WireError("\(n) forwarded headers exceed the limit of 64") }
                var out: [ForwardedHeader] = []
                for _ in 0..<n { out.append(ForwardedHeader(name: try r.string("header name", limit: 256), value: try r.string("header value", limit: 8192))) }
                return out
            }
            let kind = try r.u8("forward frame kind")
            let f: ForwardFrame
            switch kind {
            case 1:
                let id = try r.u64(), deadline = try r.u32()
                let method = try r.string("method", limit: 16), path = try r.string("path", limit: 4096)
                let query = try r.string("query", limit: 8192), type = try r.string("content type", limit: 256)
                let h = try headers()
                let b = try r.blob("body")
                f = .request(id: id, call: ForwardedCall(method: method, path: path, query: query, contentType: type, headers: h,
                                                         body: b, deadlineMilliseconds: deadline))
            case 2:
                let id = try r.u64(), status = try r.u16()
                let h = try headers()
                f = .response(id: id, answer: ForwardedAnswer(status: status, headers: h, body: try r.blob("body")))
            default: throw WireError("unknown forward frame kind \(kind)")
            }
            guard r.isAtEnd else { throw WireError("\(r.remaining) trailing bytes in a forward frame") }
            return f
        } catch let e as WireError {
            throw e
        } catch {
            throw WireError("malformed forward frame: \(error)")
        }
    }
}

/// One header of a forwarded call or answer.
public struct ForwardedHeader: Hashable, Sendable {
    public var name: String
    public var value: String
    public init(name: String, value: String) {
        self.name = name
        self.value = value
    }
}

/// An HTTP API call, as the forwarding site received (and authenticated) it.
public struct ForwardedCall: Hashable, Sendable {
    public var method: String
    public var path: String
    public var query: String
    public var contentType: String
    /// Application headers the primary needs (document metadata, the caller's scope).
    public var headers: [ForwardedHeader]
    public var body: [UInt8]
    /// How long the forwarding site will wait for the answer.
    public var deadlineMilliseconds: UInt32

    public init(method: String, path: String, query: String, contentType: String, headers: [ForwardedHeader], body: [UInt8],
                deadlineMilliseconds: UInt32) {
        self.method = method
        self.path = path
        self.query = query
        self.contentType = contentType
        self.headers = headers
        self.body = body
        self.deadlineMilliseconds = deadlineMilliseconds
    }

    public func header(_ name: String) -> String? { headers.first { $0.name.lowercased() == name.lowercased() }?.value }
}

/// The primary's answer to a forwarded call.
public struct ForwardedAnswer: Hashable, Sendable {
    public var status: UInt16
    public var headers: [ForwardedHeader]
    public var body: [UInt8]
    public init(status: UInt16, headers: [ForwardedHeader], body: [UInt8]) {
        self.status = status
        self.headers = headers
        self.body = body
    }
}

// MARK: - Encoding

public struct WireEncoder: Sendable {
    public var compression: RecordCompression
    public private(set) var statistics = WireStatistics()

    /// Raw bytes per chunk of encoding 2 (tests try the bounds of the accepted range).
    var lz4ChunkBytes = Wire.lz4ChunkBytes

    public init(compression: RecordCompression) { self.compression = compression }
    /// LZ4 in chunks when `compress`.
    public init(compress: Bool) { self.init(compression: compress ? .lz4Chunks : .none) }
    public var compress: Bool { compression != .none }

    public static func frame(_ type: Wire.FrameType, _ body: [UInt8]) -> [UInt8] {
        var w = ByteWriter(capacity: body.count + 5)
        w.u32(UInt32(body.count + 1))
        w.u8(type.rawValue)
        w.raw(body)
        return w.bytes
    }

    public static func hello(_ h: Hello) -> [UInt8] {
        var w = ByteWriter(capacity: 64)
        w.raw(Wire.magic)
        w.u16(h.version)
        w.raw(h.clusterID.bytes)
        shortString(h.siteID.name, &w)
        w.u32(h.features)
        if h.features & Wire.featureKeepalive != 0 { w.u32(h.peerTimeoutMilliseconds) }
        return frame(.hello, w.bytes)
    }

    static func shortString(_ s: String, _ w: inout ByteWriter) {
        let b = Array(s.utf8.prefix(Int(UInt16.max)))
        w.u16(UInt16(b.count))
        w.raw(b)
    }

    public mutating func message(_ m: Message) -> [UInt8] {
        // The frame is built in place: length (patched at the end), type, body. A record
        // block is appended into an array of the frame's final size (`append(atMost:)`).
        var w = ByteWriter(capacity: 128 + m.from.name.utf8.count + m.to.name.utf8.count)
        w.u32(0)
        w.u8(Wire.FrameType.message.rawValue)
        Self.shortString(m.from.name, &w)
        Self.shortString(m.to.name, &w)
        w.u64(m.term.rawValue)
        switch m.body {
        case let .preVote(lastLSN, lastTerm):
            w.u8(1); w.u64(lastLSN.rawValue); w.u64(lastTerm.rawValue)
        case let .preVoteResponse(granted, lastLSN, lastTerm):
            w.u8(2); w.u8(granted ? 1 : 0); w.u64(lastLSN.rawValue); w.u64(lastTerm.rawValue)
        case let .vote(lastLSN, lastTerm, transfer):
            w.u8(3); w.u64(lastLSN.rawValue); w.u64(lastTerm.rawValue); w.u8(transfer ? 1 : 0)
        case let .voteResponse(granted, lastLSN, lastTerm):
            w.u8(4); w.u8(granted ? 1 : 0); w.u64(lastLSN.rawValue); w.u64(lastTerm.rawValue)
        case let .append(a):
            w.u8(5); w.u64(a.prevLSN.rawValue); w.u64(a.prevTerm.rawValue); w.u64(a.commitLSN.rawValue); w.u64(a.round)
            records(a.records, &w)
        case let .appendResponse(r):
            w.u8(6); w.u8(r.success ? 1 : 0); w.u64(r.matchLSN.rawValue); w.u64(r.lastLSN.rawValue); w.u64(r.round)
        case .timeoutNow:
            w.u8(7)
        case let .fetch(prevLSN, prevTerm):
            w.u8(8); w.u64(prevLSN.rawValue); w.u64(prevTerm.rawValue)
        case let .fetchResponse(r):
            w.u8(9); w.u8(r.success ? 1 : 0); w.u64(r.prevLSN.rawValue); w.u64(r.prevTerm.rawValue); w.u64(r.lastLSN.rawValue)
            records(r.records, &w)
        }
        w.patchU32(at: 0, UInt32(w.count - 4))
        return Self.fitted(w.bytes)
    }

    /// `frame` in an array of about its size when compression left most of its memory
    /// unused: a send queue bounds the bytes it counts, and a queue of well-compressed
    /// frames kept at their raw size could hold hundreds of times its bound.
    static func fitted(_ frame: [UInt8]) -> [UInt8] {
        guard frame.capacity > 2 * frame.count + (64 << 10) else { return frame }
        return [UInt8](unsafeUninitializedCapacity: frame.count) { dst, count in
            frame.withUnsafeBufferPointer { src in
                if let s = src.baseAddress, let d = dst.baseAddress { d.initialize(from: s, count: src.count) }
            }
            count = frame.count
        }
    }

    /// Writes `records` as a record block (term, LSN, kind, length, payload each) into
    /// `dst`, stopping before a record that would not fit; returns the bytes written.
    /// One pass of stores and copies: the block of a catch-up batch is a megabyte.
    static func write(_ records: [LogRecord], into dst: UnsafeMutableRawBufferPointer) -> Int {
        guard let base = dst.baseAddress else { return 0 }
        var o = 0
        for r in records {
            let n = r.payload.count
            guard o + 21 + n <= dst.count else { break }
            dst.storeBytes(of: r.term.rawValue.littleEndian, toByteOffset: o, as: UInt64.self)
            dst.storeBytes(of: r.lsn.rawValue.littleEndian, toByteOffset: o + 8, as: UInt64.self)
            dst.storeBytes(of: r.kind.rawValue, toByteOffset: o + 16, as: UInt8.self)
            dst.storeBytes(of: UInt32(n).littleEndian, toByteOffset: o + 17, as: UInt32.self)
            r.payload.withUnsafeBytes { p in
                if let src = p.baseAddress { (base + o + 21).copyMemory(from: src, byteCount: n) }
            }
            o += 21 + n
        }
        return o
    }

    mutating func records(_ records: [LogRecord], _ w: inout ByteWriter) {
        w.u32(UInt32(records.count))
        let rawCount = records.reduce(0) { $0 + 21 + $1.payload.count }
        if !(compress && rawCount >= Wire.compressionThreshold) {
            // Plain: written straight into the frame.
            w.u8(0)
            w.u32(UInt32(rawCount))
            w.append(atMost: rawCount) { Self.write(records, into: $0) }
            statistics.recordBytesRaw += rawCount
            statistics.recordBytesSent += rawCount
            return
        }
        if compression == .lz4Chunks {
            statistics.recordBytesRaw += rawCount
            lz4Chunks(records, rawCount: rawCount, &w)
            return
        }
        var raw = ByteWriter()
        raw.append(atMost: rawCount) { Self.write(records, into: $0) }
        statistics.recordBytesRaw += raw.count
        // Compressed straight into the frame: no zeroed scratch buffer and no second copy.
        let start = w.count
        w.u8(1)
        w.u32(UInt32(raw.count))
        let packedLengthAt = w.count
        w.u32(0)
        let packed = raw.bytes.withUnsafeBytes { src in Self.lz4(src, into: &w) }
        if packed > 0 && packed < raw.count {
            w.patchU32(at: packedLengthAt, UInt32(packed))
            statistics.recordBytesSent += packed
        } else {
            // Incompressible (or LZ4 failed): the block goes plain.
            w.truncate(to: start)
            w.u8(0)
            w.u32(UInt32(raw.count))
            w.raw(raw.bytes)
            statistics.recordBytesSent += raw.count
        }
    }

    /// Encoding 2: raw length, chunk size, then per chunk its stored length (0: the chunk's
    /// raw bytes follow as they are, as for a scanned upload LZ4 cannot shrink) and bytes.
    /// The records' plain form is gathered one chunk at a time in scratch memory, never
    /// as a whole block: a megabyte array per message cost its allocation and page faults.
    private mutating func lz4Chunks(_ records: [LogRecord], rawCount: Int, _ w: inout ByteWriter) {
        let chunk = min(max(lz4ChunkBytes, Wire.lz4ChunkBytesRange.lowerBound), Wire.lz4ChunkBytesRange.upperBound)
        w.u8(2)
        w.u32(UInt32(rawCount))
        w.u32(UInt32(chunk))
        let before = w.count
        // Room for the worst case (every chunk stored), so the frame never regrows.
        w.reserve(rawCount + 4 * (rawCount / chunk + 1))
        let bound = Int(LZ4_compressBound(Int32(chunk)))
        // Scratch: the chunk being gathered, a record header, LZ4's output.
        withUnsafeTemporaryAllocation(byteCount: chunk + 32 + bound, alignment: 16) { scratch in
            guard let base = scratch.baseAddress else { return }
            let header = base + chunk, output = header + 32
            var fill = 0
            func emit() {
                let packed = Int(LZ4_compress_default(base.assumingMemoryBound(to: CChar.self), output.assumingMemoryBound(to: CChar.self),
                                                      Int32(fill), Int32(bound)))
                if packed > 0 && packed < fill {
                    w.u32(UInt32(packed))
                    w.raw(UnsafeRawBufferPointer(start: output, count: packed))
                } else {
                    w.u32(0)
                    w.raw(UnsafeRawBufferPointer(start: base, count: fill))
                }
                fill = 0
            }
            func put(_ src: UnsafeRawBufferPointer) {
                guard var from = src.baseAddress else { return }
                var left = src.count
                while left > 0 {
                    let n = min(left, chunk - fill)
                    (base + fill).copyMemory(from: from, byteCount: n)
                    fill += n
                    from += n
                    left -= n
                    if fill == chunk { emit() }
                }
            }
            for r in records {
                header.storeBytes(of: r.term.rawValue.littleEndian, toByteOffset: 0, as: UInt64.self)
                header.storeBytes(of: r.lsn.rawValue.littleEndian, toByteOffset: 8, as: UInt64.self)
                header.storeBytes(of: r.kind.rawValue, toByteOffset: 16, as: UInt8.self)
                header.storeBytes(of: UInt32(r.payload.count).littleEndian, toByteOffset: 17, as: UInt32.self)
                put(UnsafeRawBufferPointer(start: header, count: 21))
                r.payload.withUnsafeBytes { put($0) }
            }
            if fill > 0 { emit() }
        }
        statistics.recordBytesSent += w.count - before
    }

    /// Appends `src` compressed as one LZ4 block; its length, or 0 when LZ4 failed (the
    /// caller then drops what was appended).
    private static func lz4(_ src: UnsafeRawBufferPointer, into w: inout ByteWriter) -> Int {
        let bound = Int(LZ4_compressBound(Int32(src.count)))
        var packed = 0
        w.append(atMost: bound) { dst in
            packed = Int(LZ4_compress_default(src.baseAddress?.assumingMemoryBound(to: CChar.self),
                                              dst.baseAddress?.assumingMemoryBound(to: CChar.self), Int32(src.count), Int32(dst.count)))
            return packed
        }
        return packed
    }
}

// MARK: - Decoding

/// Limits a decoder enforces before allocating anything.
public struct WireLimits: Hashable, Sendable {
    /// Largest frame accepted (bytes after the length field).
    public var maxFrameBytes: Int = 32 << 20
    /// Largest decompressed record block.
    public var maxRecordBlockBytes: Int = 64 << 20
    /// Most records in one message.
    public var maxRecords: Int = 1_000_000

    public init() {}

    /// The limits before the hellos are exchanged: no frame larger than a hello can be
    /// (a site id is at most 65,535 bytes).
    public var forHandshake: WireLimits {
        var l = self
        l.maxFrameBytes = min(maxFrameBytes, 1 << 17)
        return l
    }
}

/// Turns a byte stream into frames, refusing anything malformed or oversized with a
/// reason (the caller then closes the connection). Never reads past what it was given.
///
/// Small frames are gathered in a buffer and copied out. A frame of more than
/// `directBodyBytes` (a catch-up batch, a snapshot chunk) is received straight into an
/// array of its own once its header has arrived: `receive` hands out the rest of that
/// array, so a megabyte decrypted by OpenSSL lands where the message decoder reads it,
/// without two more copies.
public struct FrameDecoder: Sendable {
    public var limits: WireLimits
    /// Received bytes are `buffer[start..<end]`; the rest of `buffer` is spare room.
    private var buffer: [UInt8] = []
    private var start = 0
    private var end = 0
    /// The frame being received into its own body array, ahead of what `buffer` holds.
    private var large: (type: Wire.FrameType, body: [UInt8], filled: Int)?

    /// Frames with bodies larger than this are received into an array of their own.
    public static let directBodyBytes = 64 << 10

    public init(limits: WireLimits = WireLimits()) { self.limits = limits }

    /// Bytes received but not yet consumed.
    public var buffered: Int { (end - start) + (large.map { 5 + $0.filled } ?? 0) }

    /// Whether a large frame is being received into its own body array (for tests).
    var isReceivingLargeFrame: Bool { large != nil }

    public mutating func feed(_ bytes: UnsafeRawBufferPointer) {
        var rest = bytes
        while !rest.isEmpty {
            let n = receive(atMost: min(rest.count, 64 << 10)) { dst in
                let k = min(dst.count, rest.count)
                dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: rest[..<k]))
                return k
            }
            rest = UnsafeRawBufferPointer(rebasing: rest[n...])
        }
    }

    public mutating func feed(_ bytes: [UInt8]) { bytes.withUnsafeBytes { feed($0) } }

    /// Lets `read` write up to `atMost` received bytes (fewer when a large frame's body
    /// needs fewer) into the decoder's memory; `read` returns how many it wrote.
    @discardableResult
    public mutating func receive(atMost: Int, _ read: (UnsafeMutableRawBufferPointer) -> Int) -> Int {
        // Nothing to offer for a non-positive count (an empty read would look like a closed
        // stream to OpenSSL), and no more than a frame can hold at once.
        let atMost = min(atMost, limits.maxFrameBytes + 4)
        guard atMost > 0 else { return 0 }
        if large == nil { startLargeFrame() }
        if var l = large, l.filled < l.body.count {
            large = nil  // so that `l.body` is the array's only reference: no copy on write
            let n = l.body.withUnsafeMutableBytes { all in
                let room = UnsafeMutableRawBufferPointer(rebasing: all[l.filled..<min(all.count, l.filled + atMost)])
                return min(max(read(room), 0), room.count)
            }
            l.filled += n
            large = l
            return n
        }
        if end + atMost > buffer.count {
            if start > 0 {
                // Move the unconsumed bytes (at most a small frame) to the front.
                buffer.withUnsafeMutableBytes { b in
                    guard let base = b.baseAddress else { return }
                    base.copyMemory(from: base + start, byteCount: end - start)
                }
                end -= start
                start = 0
            }
            if end + atMost > buffer.count {
                buffer.append(contentsOf: repeatElement(0, count: max(end + atMost, 2 * buffer.count) - buffer.count))
            }
        }
        let n = buffer.withUnsafeMutableBytes { b in
            let room = UnsafeMutableRawBufferPointer(rebasing: b[end..<(end + atMost)])
            return min(max(read(room), 0), room.count)
        }
        end += n
        return n
    }

    /// When the buffer starts with the header of an incomplete frame that is large and
    /// within the limits, moves what arrived of its body into an array of the body's size.
    /// Anything wrong with the header is left for `next` to report.
    private mutating func startLargeFrame() {
        guard end - start >= 5 else { return }
        let length = Int(buffer.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: start, as: UInt32.self)) })
        guard length - 1 > Self.directBodyBytes, length <= limits.maxFrameBytes, end - start < 4 + length,
              let type = Wire.FrameType(rawValue: buffer[start + 4]) else { return }
        let have = end - start - 5
        // The array's count is the body's size from the start, its tail not yet written:
        // harmless for bytes while this decoder holds the only reference and hands the
        // array out (in `next`) only once `receive` has written every byte.
        let body = [UInt8](unsafeUninitializedCapacity: length - 1) { b, count in
            buffer.withUnsafeBytes { src in
                UnsafeMutableRawBufferPointer(b).copyMemory(from: UnsafeRawBufferPointer(rebasing: src[(start + 5)..<end]))
            }
            count = length - 1
        }
        large = (type, body, have)
        start = 0
        end = 0
    }

    /// The next complete frame, nil if more bytes are needed.
    public mutating func next() throws(WireError) -> (type: Wire.FrameType, body: [UInt8])? {
        if let l = large {
            guard l.filled == l.body.count else { return nil }
            large = nil
            return (l.type, l.body)
        }
        guard end - start >= 4 else { return nil }
        let length = Int(buffer.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: start, as: UInt32.self)) })
        guard length >= 1 else { throw WireError("empty frame") }
        guard length <= limits.maxFrameBytes else {
            throw WireError("frame of \(length) bytes exceeds the limit of \(limits.maxFrameBytes)")
        }
        // The type is judged as soon as it is here, before the body is gathered.
        guard end - start >= 5 else { return nil }
        let typeByte = buffer[start + 4]
        guard let type = Wire.FrameType(rawValue: typeByte) else { throw WireError("unknown frame type \(typeByte)") }
        guard end - start >= 4 + length else { return nil }
        let body = Array(buffer[(start + 5)..<(start + 4 + length)])
        start += 4 + length
        if start == end {
            start = 0
            end = 0
        }
        return (type, body)
    }

    public static func hello(_ body: [UInt8]) throws(WireError) -> Hello {
        var r = ByteReader(body)
        do {
            guard try r.raw(4, "magic") == Wire.magic else { throw WireError("not a Tandem peer (bad magic)") }
            let version = try r.u16("version")
            guard let cid = ClusterID(bytes: try r.raw(16, "cluster id")) else { throw WireError("bad cluster id") }
            let site = try shortString(&r, "site id")
            let features = try r.u32("features")
            var timeout: UInt32 = 0
            if features & Wire.featureKeepalive != 0 {
                timeout = try r.u32("peer timeout")
                guard timeout >= Wire.minimumPeerTimeoutMilliseconds else {
                    throw WireError("peer timeout of \(timeout) ms is below the minimum of \(Wire.minimumPeerTimeoutMilliseconds) ms")
                }
            }
            guard r.isAtEnd else { throw WireError("\(r.remaining) trailing bytes in hello") }
            return Hello(version: version, clusterID: cid, siteID: SiteID(site), features: features, peerTimeoutMilliseconds: timeout)
        } catch let e as WireError {
            throw e
        } catch {
            throw WireError("malformed hello: \(error)")
        }
    }

    static func shortString(_ r: inout ByteReader, _ what: String) throws -> String {
        let n = Int(try r.u16("\(what) length"))
        let b = try r.raw(n, what)
        guard let s = String(validating: b, as: UTF8.self), !s.isEmpty else { throw WireError("\(what) is not valid UTF-8") }
        return s
    }

    public func message(_ body: [UInt8]) throws(WireError) -> Message {
        var r = ByteReader(body)
        do {
            let from = SiteID(try Self.shortString(&r, "from"))
            let to = SiteID(try Self.shortString(&r, "to"))
            let term = Term(try r.u64("term"))
            let kind = try r.u8("message kind")
            let b: Message.Body
            func lsn() throws -> LSN { LSN(try r.u64("LSN")) }
            func t() throws -> Term { Term(try r.u64("term")) }
            func flag() throws -> Bool {
                let v = try r.u8("flag")
                guard v <= 1 else { throw WireError("flag byte \(v) is neither 0 nor 1") }
                return v == 1
            }
            switch kind {
            case 1: b = .preVote(lastLSN: try lsn(), lastTerm: try t())
            case 2: b = .preVoteResponse(granted: try flag(), lastLSN: try lsn(), lastTerm: try t())
            case 3: b = .vote(lastLSN: try lsn(), lastTerm: try t(), transfer: try flag())
            case 4: b = .voteResponse(granted: try flag(), lastLSN: try lsn(), lastTerm: try t())
            case 5:
                let prev = try lsn(), prevTerm = try t(), commit = try lsn(), round = try r.u64("round")
                b = .append(Append(prevLSN: prev, prevTerm: prevTerm, records: try records(&r), commitLSN: commit, round: round))
            case 6:
                b = .appendResponse(AppendResponse(success: try flag(), matchLSN: try lsn(), lastLSN: try lsn(), round: try r.u64("round")))
            case 7: b = .timeoutNow
            case 8: b = .fetch(prevLSN: try lsn(), prevTerm: try t())
            case 9:
                let ok = try flag(), prev = try lsn(), prevTerm = try t(), last = try lsn()
                b = .fetchResponse(FetchResponse(success: ok, prevLSN: prev, prevTerm: prevTerm, records: try records(&r), lastLSN: last))
            default: throw WireError("unknown message kind \(kind)")
            }
            guard r.isAtEnd else { throw WireError("\(r.remaining) trailing bytes in a message") }
            return Message(from: from, to: to, term: term, body: b)
        } catch let e as WireError {
            throw e
        } catch {
            throw WireError("malformed message: \(error)")
        }
    }

    func records(_ r: inout ByteReader) throws -> [LogRecord] {
        let count = Int(try r.u32("record count"))
        guard count <= limits.maxRecords else { throw WireError("\(count) records exceed the limit of \(limits.maxRecords)") }
        let encoding = try r.u8("record encoding")
        let rawLength = Int(try r.u32("record block length"))
        guard rawLength <= limits.maxRecordBlockBytes else {
            throw WireError("record block of \(rawLength) bytes exceeds the limit of \(limits.maxRecordBlockBytes)")
        }
        guard rawLength >= count * 21 else { throw WireError("record block of \(rawLength) bytes cannot hold \(count) records") }
        let raw: [UInt8]
        switch encoding {
        case 0:
            // Decoded in place, without copying the block first.
            guard r.remaining >= rawLength else { throw WireError("record block truncated") }
            var block = r
            let records = try decodeRecords(&block, count: count, end: r.offset + rawLength)
            r = block
            return records
        case 1:
            let stored = Int(try r.u32("compressed length"))
            // Refused before the allocation: LZ4 expands at most 255 times.
            guard rawLength <= Wire.lz4MaxExpansion * stored else {
                throw WireError("compressed records of \(stored) bytes cannot decompress to \(rawLength) bytes")
            }
            let packed = try r.raw(stored, "compressed records")
            // Into uninitialized memory: LZ4 writes every byte it reports, and a short or
            // failed result keeps none of them.
            var n: Int32 = 0
            let out = [UInt8](unsafeUninitializedCapacity: rawLength) { dst, count in
                n = packed.withUnsafeBytes { src in
                    LZ4_decompress_safe(src.baseAddress?.assumingMemoryBound(to: CChar.self),
                                        UnsafeMutableRawPointer(dst.baseAddress)?.assumingMemoryBound(to: CChar.self),
                                        Int32(stored), Int32(rawLength))
                }
                count = Int(n) == rawLength ? rawLength : 0
            }
            guard Int(n) == rawLength else { throw WireError("compressed records do not decompress to \(rawLength) bytes") }
            raw = out
        case 2:
            raw = try lz4Chunks(&r, rawLength: rawLength)
        default:
            throw WireError("unknown record encoding \(encoding)")
        }
        var rr = ByteReader(raw)
        return try decodeRecords(&rr, count: count, end: raw.count)
    }

    /// Decodes an encoding-2 block (`WireEncoder.lz4Chunks`) into its raw bytes.
    func lz4Chunks(_ r: inout ByteReader, rawLength: Int) throws -> [UInt8] {
        let chunk = Int(try r.u32("chunk size"))
        guard Wire.lz4ChunkBytesRange.contains(chunk) else {
            throw WireError("chunk size \(chunk) is outside \(Wire.lz4ChunkBytesRange.lowerBound)...\(Wire.lz4ChunkBytesRange.upperBound)")
        }
        // Refused before the allocation when what remains cannot hold the chunks: each
        // takes at least its length field, and LZ4 expands at most 255 times.
        let chunks = (rawLength + chunk - 1) / chunk
        guard r.remaining >= 4 * chunks, rawLength <= Wire.lz4MaxExpansion * r.remaining else {
            throw WireError("\(r.remaining) bytes cannot hold \(chunks) chunks of \(rawLength) raw bytes")
        }
        // Into uninitialized memory; on any error none of it is kept.
        return try [UInt8](unsafeUninitializedCapacity: rawLength) { dst, count in
            count = 0
            var offset = 0, index = 0
            while offset < rawLength {
                let n = min(chunk, rawLength - offset)
                let stored = Int(try r.u32("stored length of chunk \(index)"))
                let out = UnsafeMutableRawBufferPointer(rebasing: UnsafeMutableRawBufferPointer(dst)[offset..<(offset + n)])
                if stored == 0 {
                    let bytes = try r.slice(n, "chunk \(index)")
                    bytes.withUnsafeBytes { out.copyMemory(from: $0) }
                } else {
                    // A sender stores a chunk LZ4 does not shrink as it is.
                    guard stored < n else { throw WireError("chunk \(index) stores \(stored) compressed bytes for \(n) raw ones") }
                    let packed = try r.slice(stored, "compressed chunk \(index)")
                    let got = packed.withUnsafeBytes { src in
                        LZ4_decompress_safe(src.baseAddress?.assumingMemoryBound(to: CChar.self),
                                            out.baseAddress?.assumingMemoryBound(to: CChar.self), Int32(stored), Int32(n))
                    }
                    guard Int(got) == n else { throw WireError("compressed chunk \(index) does not decompress to \(n) bytes") }
                }
                offset += n
                index += 1
            }
            count = rawLength
        }
    }

    /// Reads `count` records from `rr`, which must end exactly at offset `end`.
    func decodeRecords(_ rr: inout ByteReader, count: Int, end: Int) throws -> [LogRecord] {
        var records: [LogRecord] = []
        records.reserveCapacity(count)
        for _ in 0..<count {
            let term = Term(try rr.u64("record term"))
            let lsn = LSN(try rr.u64("record LSN"))
            let kindByte = try rr.u8("record kind")
            guard let kind = RecordKind(rawValue: kindByte) else { throw WireError("unknown record kind \(kindByte)") }
            let payload = try rr.blobSlice("record payload", limit: limits.maxRecordBlockBytes)
            if let last = records.last, last.lsn.rawValue == .max || lsn != last.lsn.next {
                throw WireError("records out of sequence: \(lsn) after \(last.lsn)")
            }
            records.append(LogRecord(term: term, lsn: lsn, kind: kind, payload: payload))
        }
        guard rr.offset == end else { throw WireError("record block length does not match its records") }
        return records
    }
}
