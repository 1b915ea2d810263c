/// Appends little-endian integers and byte strings to a growing buffer. Every on-disk
/// and wire format in Tandem is little-endian.
public struct ByteWriter: Sendable {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 0) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public var count: Int { bytes.count }

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

    private mutating func need(_ n: Int, _ what: String) throws {
        guard n >= 0, remaining >= n else {
            throw DecodingError("truncated \(what): need \(n) bytes, have \(remaining)", offset: offset)
        }
    }

    public mutating func u8(_ what: String = "u8") throws -> UInt8 {
        try need(1, what)
        defer { offset += 1 }
        return bytes[offset]
    }

    public mutating func u16(_ what: String = "u16") throws -> UInt16 {
        try need(2, what)
        defer { offset += 2 }
        return bytes.withUnsafeBytes { UInt16(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt16.self)) }
    }

    public mutating func u32(_ what: String = "u32") throws -> UInt32 {
        try need(4, what)
        defer { offset += 4 }
        return bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    }

    public mutating func u64(_ what: String = "u64") throws -> UInt64 {
        try need(8, what)
        defer { offset += 8 }
        return bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
    }

    public mutating func i64(_ what: String = "i64") throws -> Int64 { Int64(bitPattern: try u64(what)) }

    public mutating func raw(_ n: Int, _ what: String = "bytes") throws -> [UInt8] {
        try need(n, what)
        defer { offset += n }
        return Array(bytes[offset..<(offset + n)])
    }

    /// A length-prefixed (u32) byte string, refusing lengths above `limit`.
    public mutating func blob(_ what: String = "blob", limit: Int = Int(Int32.max)) throws -> [UInt8] {
        let n = Int(try u32("\(what) length"))
        guard n <= limit else { throw DecodingError("\(what) of \(n) bytes exceeds the limit of \(limit)", offset: offset) }
        return try raw(n, what)
    }

    public mutating func string(_ what: String = "string", limit: Int = Int(Int32.max)) throws -> String {
        let b = try blob(what, limit: limit)
        guard let s = String(validating: b, as: UTF8.self) else {
            throw DecodingError("\(what) is not valid UTF-8", offset: offset)
        }
        return s
    }
}
