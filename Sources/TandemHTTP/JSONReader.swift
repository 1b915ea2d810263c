/// Why a request body is not JSON, and where.
struct JSONSyntaxError: Error, Equatable {
    var reason: String
    var offset: Int
}

/// A strict JSON reader over the bytes of a request body, straight into `JSONValue`.
/// Foundation's JSONDecoder took a twentieth of a primary's CPU per write (generic
/// decoding, a thrown error per kind tried); this reads each byte once. Integers without
/// a fraction or exponent that fit in 64 bits stay integers; other numbers that are whole
/// and fit are integers too (as JSONDecoder gave them), the rest doubles.
struct JSONReader {
    /// Deeper nesting is refused (a request is a few levels deep; this bounds recursion).
    static let maxDepth = 64
    /// More values in one body are refused while reading, before they take memory: a
    /// body of the largest allowed size made of "0," would otherwise become ten million
    /// values (half a gigabyte) before the store's limits (256 statements of at most 999
    /// parameters, which fit with room to spare) could refuse it.
    static let maxValues = 1 << 18

    private let bytes: [UInt8]
    private var i = 0
    private var values = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    /// The one value the bytes hold, with nothing but whitespace around it.
    mutating func document() throws(JSONSyntaxError) -> JSONValue {
        skipSpace()
        let v = try value(depth: 0)
        skipSpace()
        guard i == bytes.count else { throw fail("unexpected text after the value") }
        return v
    }

    private func fail(_ reason: String) -> JSONSyntaxError { JSONSyntaxError(reason: reason, offset: i) }

    private mutating func skipSpace() {
        while i < bytes.count {
            switch bytes[i] {
            case 0x20, 0x09, 0x0A, 0x0D: i += 1
            default: return
            }
        }
    }

    private mutating func value(depth: Int) throws(JSONSyntaxError) -> JSONValue {
        guard i < bytes.count else { throw fail("the body ends where a value was expected") }
        values += 1
        guard values <= Self.maxValues else { throw fail("more than \(Self.maxValues) values") }
        switch bytes[i] {
        case UInt8(ascii: "{"): return try object(depth: depth + 1)
        case UInt8(ascii: "["): return try array(depth: depth + 1)
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
        default: throw fail("unexpected character where a value was expected")
        }
    }

    private mutating func literal(_ word: StaticString) throws(JSONSyntaxError) {
        let n = word.utf8CodeUnitCount
        guard i + n <= bytes.count else { throw fail("the body ends inside a literal") }
        for k in 0..<n where bytes[i + k] != word.utf8Start[k] { throw fail("unknown literal") }
        i += n
    }

    private mutating func object(depth: Int) throws(JSONSyntaxError) -> JSONValue {
        guard depth <= Self.maxDepth else { throw fail("nested deeper than \(Self.maxDepth) levels") }
        i += 1
        var fields: [String: JSONValue] = [:]
        skipSpace()
        if i < bytes.count, bytes[i] == UInt8(ascii: "}") { i += 1; return .object(fields) }
        while true {
            skipSpace()
            guard i < bytes.count, bytes[i] == UInt8(ascii: "\"") else { throw fail("expected a quoted key") }
            let start = i
            let key = try string()
            skipSpace()
            guard i < bytes.count, bytes[i] == UInt8(ascii: ":") else { throw fail("expected ':' after a key") }
            i += 1
            skipSpace()
            let v = try value(depth: depth)
            guard fields.updateValue(v, forKey: key) == nil else {
                throw JSONSyntaxError(reason: "the key \"\(key)\" appears twice", offset: start)
            }
            skipSpace()
            guard i < bytes.count else { throw fail("the body ends inside an object") }
            if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
            if bytes[i] == UInt8(ascii: "}") { i += 1; return .object(fields) }
            throw fail("expected ',' or '}' in an object")
        }
    }

    private mutating func array(depth: Int) throws(JSONSyntaxError) -> JSONValue {
        guard depth <= Self.maxDepth else { throw fail("nested deeper than \(Self.maxDepth) levels") }
        i += 1
        var items: [JSONValue] = []
        skipSpace()
        if i < bytes.count, bytes[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
        while true {
            skipSpace()
            items.append(try value(depth: depth))
            skipSpace()
            guard i < bytes.count else { throw fail("the body ends inside an array") }
            if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
            if bytes[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
            throw fail("expected ',' or ']' in an array")
        }
    }

    private mutating func string() throws(JSONSyntaxError) -> String {
        i += 1  // the opening quote
        let start = i
        // Fast path: no escapes. The bytes between the quotes are the string's UTF-8.
        while i < bytes.count {
            let b = bytes[i]
            if b == UInt8(ascii: "\"") {
                let s = try utf8(bytes[start..<i])
                i += 1
                return s
            }
            if b == UInt8(ascii: "\\") { break }
            guard b >= 0x20 else { throw fail("a control character inside a string must be escaped") }
            i += 1
        }
        var out = Array(bytes[start..<i])
        while i < bytes.count {
            let b = bytes[i]
            switch b {
            case UInt8(ascii: "\""):
                i += 1
                return try utf8(out[...])
            case UInt8(ascii: "\\"):
                i += 1
                guard i < bytes.count else { throw fail("the body ends inside an escape") }
                let e = bytes[i]
                i += 1
                switch e {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var scalar = try hex4()
                    if (0xD800..<0xDC00).contains(scalar) {
                        // A high surrogate must be followed by an escaped low one.
                        guard i + 1 < bytes.count, bytes[i] == UInt8(ascii: "\\"), bytes[i + 1] == UInt8(ascii: "u") else {
                            throw fail("an unpaired surrogate in a \\u escape")
                        }
                        i += 2
                        let low = try hex4()
                        guard (0xDC00..<0xE000).contains(low) else { throw fail("an unpaired surrogate in a \\u escape") }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    } else if (0xDC00..<0xE000).contains(scalar) {
                        throw fail("an unpaired surrogate in a \\u escape")
                    }
                    guard let u = Unicode.Scalar(scalar) else { throw fail("an invalid \\u escape") }
                    out.append(contentsOf: Array(String(Character(u)).utf8))
                default: throw fail("an unknown escape")
                }
            default:
                guard b >= 0x20 else { throw fail("a control character inside a string must be escaped") }
                out.append(b)
                i += 1
            }
        }
        throw fail("the body ends inside a string")
    }

    private mutating func hex4() throws(JSONSyntaxError) -> UInt32 {
        guard i + 4 <= bytes.count else { throw fail("the body ends inside a \\u escape") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let b = bytes[i]
            let d: UInt8
            switch b {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = b - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = b - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = b - UInt8(ascii: "A") + 10
            default: throw fail("a \\u escape needs four hexadecimal digits")
            }
            v = v << 4 | UInt32(d)
            i += 1
        }
        return v
    }

    private func utf8(_ slice: ArraySlice<UInt8>) throws(JSONSyntaxError) -> String {
        guard let s = String(validating: slice, as: UTF8.self) else { throw fail("a string is not valid UTF-8") }
        return s
    }

    private mutating func number() throws(JSONSyntaxError) -> JSONValue {
        let start = i
        var negative = false
        if bytes[i] == UInt8(ascii: "-") { negative = true; i += 1 }
        guard i < bytes.count, isDigit(bytes[i]) else { throw fail("a number needs digits") }
        // Accumulate negatively so that Int64.min fits.
        var magnitude: Int64 = 0
        var overflow = false
        if bytes[i] == UInt8(ascii: "0") {
            i += 1
            if i < bytes.count, isDigit(bytes[i]) { throw fail("a number must not have a leading zero") }
        } else {
            while i < bytes.count, isDigit(bytes[i]) {
                let d = Int64(bytes[i] - UInt8(ascii: "0"))
                let (m, o1) = magnitude.multipliedReportingOverflow(by: 10)
                let (n, o2) = m.subtractingReportingOverflow(d)
                if o1 || o2 { overflow = true } else { magnitude = n }
                i += 1
            }
        }
        var integral = true
        if i < bytes.count, bytes[i] == UInt8(ascii: ".") {
            integral = false
            i += 1
            guard i < bytes.count, isDigit(bytes[i]) else { throw fail("a fraction needs digits") }
            while i < bytes.count, isDigit(bytes[i]) { i += 1 }
        }
        if i < bytes.count, bytes[i] == UInt8(ascii: "e") || bytes[i] == UInt8(ascii: "E") {
            integral = false
            i += 1
            if i < bytes.count, bytes[i] == UInt8(ascii: "+") || bytes[i] == UInt8(ascii: "-") { i += 1 }
            guard i < bytes.count, isDigit(bytes[i]) else { throw fail("an exponent needs digits") }
            while i < bytes.count, isDigit(bytes[i]) { i += 1 }
        }
        if integral && !overflow {
            if negative { return .integer(magnitude) }
            if magnitude != .min { return .integer(-magnitude) }
        }
        guard let d = Double(String(decoding: bytes[start..<i], as: UTF8.self)), d.isFinite else {
            throw JSONSyntaxError(reason: "a number out of range", offset: start)
        }
        // A whole number written with a fraction or an exponent is an integer, as it was
        // before (2.0 binds as 2), where the double surely holds it exactly (below 2^53); an
        // integer literal beyond 64 bits stays a double rather than be clamped.
        if !integral, d == d.rounded(), abs(d) < 9_007_199_254_740_992 { return .integer(Int64(d)) }
        return .number(d)
    }

    private func isDigit(_ b: UInt8) -> Bool { b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9") }
}
