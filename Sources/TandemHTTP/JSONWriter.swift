import Foundation

/// Writes an answer built of Swift values as JSON text (RFC 8259), object keys sorted so
/// that answers are byte-for-byte reproducible. `write` returns false, having written
/// part of it, for a value it does not know; the caller then falls back.
struct JSONWriter {
    private(set) var bytes: [UInt8] = []

    init() { bytes.reserveCapacity(256) }

    mutating func write(_ value: Any) -> Bool {
        switch value {
        case let s as String: string(s)
        case let d as [String: Any]:
            bytes.append(UInt8(ascii: "{"))
            for (n, key) in d.keys.sorted().enumerated() {
                if n > 0 { bytes.append(UInt8(ascii: ",")) }
                string(key)
                bytes.append(UInt8(ascii: ":"))
                guard let v = d[key], write(v) else { return false }
            }
            bytes.append(UInt8(ascii: "}"))
        case let a as [Any]:
            bytes.append(UInt8(ascii: "["))
            for (n, v) in a.enumerated() {
                if n > 0 { bytes.append(UInt8(ascii: ",")) }
                guard write(v) else { return false }
            }
            bytes.append(UInt8(ascii: "]"))
        case let b as Bool: ascii(b ? "true" : "false")
        case let i as Int: ascii(String(i))
        case let i as Int64: ascii(String(i))
        case let i as UInt64: ascii(String(i))
        case let i as Int32: ascii(String(i))
        case let i as UInt32: ascii(String(i))
        case let i as UInt16: ascii(String(i))
        case let i as UInt8: ascii(String(i))
        case let d as Double:
            guard d.isFinite else { return false }
            // Whole doubles as integers where exact (as JSONSerialization wrote them).
            if d == d.rounded(), abs(d) < 1e15 { ascii(String(Int64(d))) } else { ascii(String(d)) }
        case is NSNull: ascii("null")
        case let o as String?:
            // An optional that reached here wrapped in Any: nil is null.
            if let o { string(o) } else { ascii("null") }
        default: return false
        }
        return true
    }

    private static let hex = Array("0123456789abcdef".utf8)

    private mutating func ascii(_ s: String) { bytes.append(contentsOf: s.utf8) }

    private mutating func string(_ s: String) {
        bytes.append(UInt8(ascii: "\""))
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\""): bytes.append(UInt8(ascii: "\\")); bytes.append(b)
            case UInt8(ascii: "\\"): bytes.append(UInt8(ascii: "\\")); bytes.append(b)
            case 0x0A: bytes.append(UInt8(ascii: "\\")); bytes.append(UInt8(ascii: "n"))
            case 0x0D: bytes.append(UInt8(ascii: "\\")); bytes.append(UInt8(ascii: "r"))
            case 0x09: bytes.append(UInt8(ascii: "\\")); bytes.append(UInt8(ascii: "t"))
            case 0..<0x20:
                bytes.append(contentsOf: [UInt8(ascii: "\\"), UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0"), Self.hex[Int(b >> 4)], Self.hex[Int(b & 0xF)]])
            default: bytes.append(b)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }
}
