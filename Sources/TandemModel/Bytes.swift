/// Appends little-endian integers and byte strings to a growing buffer. Every on-disk
/// and wire format in Tandem is little-endian.
public struct ByteWriter: Sendable {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 0) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public var count: Int { bytes.count }

    /// Makes room for `extra` more bytes at once.
    public mutating func reserve(_ extra: Int) { bytes.reserveCapacity(bytes.count + max(extra, 0)) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }
    public mutating func raw(_ v: [UInt8]) { bytes.append(contentsOf: v) }
    public mutating func raw(_ v: UnsafeRawBufferPointer) { bytes.append(contentsOf: v) }
    public mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }

    /// A length-prefixed (u32) byte string.
    public mutating func blob(_ v: [UInt8]) {
        u32(UInt32(v.count))
        raw(v)
    }

    /// A length-prefixed (u32) UTF-8 string.
    public mutating func string(_ v: String) { blob(Array(v.utf8)) }

    /// Appends what `fill` writes into at most `maxCount` bytes of uninitialized memory
    /// (it returns how many it wrote), sparing the zero-filling of a large block that is
    /// about to be overwritten, such as a compressor's output. It copies the bytes already
    /// written into a new array: call it once per buffer, not in a loop.
    public mutating func append(atMost maxCount: Int, _ fill: (UnsafeMutableRawBufferPointer) -> Int) {
        let maxCount = max(maxCount, 0)
        let old = bytes
        bytes = [UInt8](unsafeUninitializedCapacity: old.count + maxCount) { buffer, count in
            let all = UnsafeMutableRawBufferPointer(buffer)
            old.withUnsafeBytes { all.copyMemory(from: $0) }
            let written = fill(UnsafeMutableRawBufferPointer(rebasing: all[old.count...]))
            count = old.count + min(max(written, 0), maxCount)
        }
    }

    /// Drops the bytes after the first `count`.
    public mutating func truncate(to count: Int) {
        if count < bytes.count { bytes.removeLast(bytes.count - count) }
    }

    /// Overwrites a u32 already written at `offset` (for lengths and checksums known late).
    public mutating func patchU32(at offset: Int, _ v: UInt32) {
        let le = v.littleEndian
        withUnsafeBytes(of: le) { src in
            for i in 0..<4 { bytes[offset + i] = src[i] }
        }
    }
}

/// An error raised while decoding bytes that do not follow their format.
public struct DecodingError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public let offset: Int
    public init(_ message: String, offset: Int) {
        self.message = message
        self.offset = offset
    }
    public var description: String { "\(message) at byte \(offset)" }
}

/// Reads little-endian integers and byte strings, failing with a clear error instead of
/// reading past the end.
public struct ByteReader {
    public let bytes: [UInt8]
    public private(set) var offset: Int

    public init(_ bytes: [UInt8], offset: Int = 0) {
        self.bytes = bytes
        self.offset = offset
    }

    public var remaining: Int { bytes.count - offset }
    public var isAtEnd: Bool { offset >= bytes.count }

    // `what` names the field in an error: an autoclosure, so that decoding a field builds
    // no string unless it fails (a profile of a receiving peer put the names at 7%).
    private mutating func need(_ n: Int, _ what: () -> String) throws {
        guard n >= 0, remaining >= n else {
            throw DecodingError("truncated \(what()): need \(n) bytes, have \(remaining)", offset: offset)
        }
    }

    public mutating func u8(_ what: @autoclosure () -> String = "u8") throws -> UInt8 {
        try need(1, what)
        defer { offset += 1 }
        return bytes[offset]
    }

    public mutating func u16(_ what: @autoclosure () -> String = "u16") throws -> UInt16 {
        try need(2, what)
        defer { offset += 2 }
        return bytes.withUnsafeBytes { UInt16(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt16.self)) }
    }

    public mutating func u32(_ what: @autoclosure () -> String = "u32") throws -> UInt32 {
        try need(4, what)
        defer { offset += 4 }
        return bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    }

    public mutating func u64(_ what: @autoclosure () -> String = "u64") throws -> UInt64 {
        try need(8, what)
        defer { offset += 8 }
        return bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
    }

    public mutating func i64(_ what: @autoclosure () -> String = "i64") throws -> Int64 { Int64(bitPattern: try u64(what())) }

    public mutating func raw(_ n: Int, _ what: @autoclosure () -> String = "bytes") throws -> [UInt8] {
        Array(try slice(n, what()))
    }

    /// `n` bytes as a slice that shares the reader's array: no copy, no allocation.
    public mutating func slice(_ n: Int, _ what: @autoclosure () -> String = "bytes") throws -> ArraySlice<UInt8> {
        try need(n, what)
        defer { offset += n }
        return bytes[offset..<(offset + n)]
    }

    /// A length-prefixed (u32) byte string as a slice of the reader's array, refusing
    /// lengths above `limit`.
    public mutating func blobSlice(_ what: @autoclosure () -> String = "blob", limit: Int = Int(Int32.max)) throws -> ArraySlice<UInt8> {
        let n = Int(try u32("\(what()) length"))
        guard n <= limit else { throw DecodingError("\(what()) of \(n) bytes exceeds the limit of \(limit)", offset: offset) }
        return try slice(n, what())
    }

    /// A length-prefixed (u32) byte string, refusing lengths above `limit`.
    public mutating func blob(_ what: @autoclosure () -> String = "blob", limit: Int = Int(Int32.max)) throws -> [UInt8] {
        Array(try blobSlice(what(), limit: limit))
    }

    public mutating func string(_ what: @autoclosure () -> String = "string", limit: Int = Int(Int32.max)) throws -> String {
        let b = try blob(what(), limit: limit)
        guard let s = String(validating: b, as: UTF8.self) else {
            throw DecodingError("\(what()) is not valid UTF-8", offset: offset)
        }
        return s
    }
}
