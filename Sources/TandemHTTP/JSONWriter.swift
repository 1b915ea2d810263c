import Foundation
import TandemStore

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

    // MARK: Typed writes, for the hot answers: no cast through Any (a write's answer
    // spent 7% of an HTTP event loop in the runtime's casts). Each writes exactly what
    // `write` writes for the same value.

    /// `{"lsn":…,"results":[…]}`: the answer to an executed write.
    mutating func execution(_ e: Execution) {
        ascii(#"{"lsn":"#)
        ascii(String(e.record.lsn.rawValue))
        ascii(#","results":["#)
        for (n, r) in e.results.enumerated() {
            if n > 0 { bytes.append(UInt8(ascii: ",")) }
            bytes.append(UInt8(ascii: "{"))
            if !r.columns.isEmpty {
                ascii(#""columns":["#)
                for (k, c) in r.columns.enumerated() {
                    if k > 0 { bytes.append(UInt8(ascii: ",")) }
                    string(c)
                }
                ascii("],")
            }
            ascii(#""last_insert_rowid":"#)
            ascii(String(r.lastInsertRowID))
            if !r.columns.isEmpty {
                ascii(#","rows":["#)
                for (k, row) in r.rows.enumerated() {
                    if k > 0 { bytes.append(UInt8(ascii: ",")) }
                    bytes.append(UInt8(ascii: "["))
                    for (j, v) in row.enumerated() {
                        if j > 0 { bytes.append(UInt8(ascii: ",")) }
                        value(v)
                    }
                    bytes.append(UInt8(ascii: "]"))
                }
                bytes.append(UInt8(ascii: "]"))
            }
            ascii(#","rows_affected":"#)
            ascii(String(r.rowsAffected))
            bytes.append(UInt8(ascii: "}"))
        }
        ascii("]}")
    }

    /// A column's value as `SQLValue.json` writes it.
    mutating func value(_ v: SQLValue) {
        switch v {
        case .null: ascii("null")
        case let .integer(i): ascii(String(i))
        case let .real(d):
            if !d.isFinite { ascii("null") } else if d == d.rounded(), abs(d) < 1e15 { ascii(String(Int64(d))) } else { ascii(String(d)) }
        case let .text(t): string(t)
        case let .blob(b):
            ascii(#"{"base64":"#)
            string(Data(b).base64EncodedString())
            bytes.append(UInt8(ascii: "}"))
        }
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
