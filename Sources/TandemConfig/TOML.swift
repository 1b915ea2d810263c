/// A TOML value. Tables keep the line each key was defined on, for error messages.
public indirect enum TOMLValue: Hashable, Sendable {
    case string(String)
    case integer(Int64)
    case float(Double)
    case bool(Bool)
    case array([TOMLValue])
    case table(TOMLTable)

    public var typeName: String {
        switch self {
        case .string: "a string"
        case .integer: "an integer"
        case .float: "a number"
        case .bool: "true or false"
        case .array: "an array"
        case .table: "a table"
        }
    }
}

/// A TOML table: keys in file order, with the line that defined each.
public struct TOMLTable: Hashable, Sendable {
    public private(set) var keys: [String] = []
    public private(set) var values: [String: TOMLValue] = [:]
    public private(set) var lines: [String: Int] = [:]

    public init() {}

    public subscript(key: String) -> TOMLValue? { values[key] }
    public func line(of key: String) -> Int? { lines[key] }

    mutating func set(_ key: String, _ value: TOMLValue, line: Int) {
        if values[key] == nil { keys.append(key) }
        values[key] = value
        lines[key] = line
    }
}

/// A document that is not valid TOML (or uses what this reader does not support), with
/// the line and column.
public struct TOMLError: Error, Hashable, Sendable, CustomStringConvertible {
    public let line: Int
    public let column: Int
    public let message: String
    public var description: String { "line \(line), column \(column): \(message)" }
}

/// A reader for the TOML that configuration files use: key = value pairs (bare, quoted
/// and dotted keys), [tables], [[arrays of tables]], basic and literal strings, integers,
/// floats, booleans, arrays and inline tables, and comments. Dates, multi-line strings
/// and hexadecimal integers are refused with a clear error.
public struct TOMLParser {
    private let chars: [Character]
    private var i = 0
    private var line = 1
    private var lineStart = 0

    public init(_ text: String) { chars = Array(text) }

    public static func parse(_ text: String) throws(TOMLError) -> TOMLTable {
        var p = TOMLParser(text)
        return try p.document()
    }

    private func fail(_ message: String) -> TOMLError { TOMLError(line: line, column: i - lineStart + 1, message: message) }
    private var atEnd: Bool { i >= chars.count }
    private var peek: Character? { atEnd ? nil : chars[i] }

    private mutating func advance() {
        if chars[i] == "\n" {
            line += 1
            lineStart = i + 1
        }
        i += 1
    }

    private mutating func skipSpaces() {
        while let c = peek, c == " " || c == "\t" { advance() }
    }

    private mutating func skipComment() {
        if peek == "#" { while let c = peek, c != "\n" { advance() } }
    }

    /// Spaces, comments and newlines (inside arrays).
    private mutating func skipBlank() {
        while let c = peek {
            if c == " " || c == "\t" || c == "\n" || c == "\r" { advance() } else if c == "#" { skipComment() } else { break }
        }
    }

    private mutating func endOfLine() throws(TOMLError) {
        skipSpaces()
        skipComment()
        if peek == "\r" { advance() }
        guard atEnd || peek == "\n" else { throw fail("expected the end of the line, found \"\(peek!)\"") }
        if !atEnd { advance() }
    }

    private mutating func document() throws(TOMLError) -> TOMLTable {
        var root = TOMLTable()
        var current: [String] = []  // path of the table being filled
        var currentIsArrayElement = false
        var definedTables: Set<String> = []
        while true {
            skipBlank()
            guard let c = peek else { break }
            let startLine = line
            if c == "[" {
                advance()
                let isArray = peek == "["
                if isArray { advance() }
                skipSpaces()
                let path = try key()
                skipSpaces()
                guard peek == "]" else { throw fail("expected \"]\" after the table name") }
                advance()
                if isArray {
                    guard peek == "]" else { throw fail("expected \"]]\" after the array-of-tables name") }
                    advance()
                }
                try endOfLine()
                let name = path.joined(separator: ".")
                if isArray {
                    try Self.appendTable(&root, path, line: startLine)
                } else {
                    guard !definedTables.contains(name) else {
                        throw TOMLError(line: startLine, column: 1, message: "table [\(name)] is defined twice")
                    }
                    definedTables.insert(name)
                    try Self.ensureTable(&root, path, line: startLine)
                }
                current = path
                currentIsArrayElement = isArray
                continue
            }
            let path = try key()
            skipSpaces()
            guard peek == "=" else { throw fail("expected \"=\" after the key \(path.joined(separator: "."))") }
            advance()
            skipSpaces()
            let v = try value()
            try endOfLine()
            try Self.assign(&root, current, arrayElement: currentIsArrayElement, path, v, line: startLine)
        }
        return root
    }

    private mutating func key() throws(TOMLError) -> [String] {
        var parts: [String] = []
        while true {
            skipSpaces()
            guard let c = peek else { throw fail("expected a key") }
            if c == "\"" {
                parts.append(try basicString())
            } else if c == "'" {
                parts.append(try literalString())
            } else {
                var s = ""
                while let c = peek, c.isLetter || c.isNumber || c == "_" || c == "-" {
                    s.append(c)
                    advance()
                }
                guard !s.isEmpty else { throw fail("expected a key, found \"\(c)\"") }
                parts.append(s)
            }
            skipSpaces()
            if peek == "." { advance() } else { break }
        }
        return parts
    }

    private mutating func value() throws(TOMLError) -> TOMLValue {
        guard let c = peek else { throw fail("expected a value") }
        switch c {
        case "\"":
            if chars.count > i + 2 && chars[i + 1] == "\"" && chars[i + 2] == "\"" { throw fail("multi-line strings are not supported") }
            return .string(try basicString())
        case "'": return .string(try literalString())
        case "[": return try array()
        case "{": return try inlineTable()
        case "t", "f":
            if matches("true") { i += 4; return .bool(true) }
            if matches("false") { i += 5; return .bool(false) }
            throw fail("expected a value (true, false, a number, a string, an array or a table)")
        default:
            return try number()
        }
    }

    private func matches(_ word: String) -> Bool {
        let w = Array(word)
        guard i + w.count <= chars.count, Array(chars[i..<(i + w.count)]) == w else { return false }
        let after = i + w.count < chars.count ? chars[i + w.count] : " "
        return !(after.isLetter || after.isNumber || after == "_")
    }

    private mutating func number() throws(TOMLError) -> TOMLValue {
        var s = ""
        while let c = peek, c.isNumber || "+-._eE".contains(c) || c.isLetter {
            s.append(c)
            advance()
        }
        guard !s.isEmpty else { throw fail("expected a value, found \"\(peek.map(String.init) ?? "end of file")\"") }
        if s.contains(":") || (s.count >= 10 && s.dropFirst(4).first == "-") { throw fail("dates are not supported") }
        let plain = s.replacingOccurrences(of: "_", with: "")
        if plain.hasPrefix("0x") || plain.hasPrefix("0o") || plain.hasPrefix("0b") { throw fail("only decimal numbers are supported, found \(s)") }
        if let n = Int64(plain) { return .integer(n) }
        if plain.contains(where: { ".eE".contains($0) }), let d = Double(plain), d.isFinite { return .float(d) }
        throw fail("\(s) is not a number")
    }

    private mutating func basicString() throws(TOMLError) -> String {
        advance()  // opening quote
        var s = ""
        while true {
            guard let c = peek, c != "\n" else { throw fail("unterminated string") }
            advance()
            if c == "\"" { return s }
            if c == "\\" {
                guard let e = peek else { throw fail("unterminated escape") }
                advance()
                switch e {
                case "\"": s.append("\"")
                case "\\": s.append("\\")
                case "n": s.append("\n")
                case "t": s.append("\t")
                case "r": s.append("\r")
                case "b": s.append("\u{08}")
                case "f": s.append("\u{0C}")
                case "u", "U":
                    let n = e == "u" ? 4 : 8
                    var hex = ""
                    for _ in 0..<n {
                        guard let h = peek, h.isHexDigit else { throw fail("\\\(e) needs \(n) hexadecimal digits") }
                        hex.append(h)
                        advance()
                    }
                    guard let v = UInt32(hex, radix: 16), let u = Unicode.Scalar(v) else { throw fail("\\\(e)\(hex) is not a Unicode scalar") }
                    s.unicodeScalars.append(u)
                default: throw fail("unknown escape \\\(e)")
                }
            } else {
                s.append(c)
            }
        }
    }

    private mutating func literalString() throws(TOMLError) -> String {
        advance()
        var s = ""
        while true {
            guard let c = peek, c != "\n" else { throw fail("unterminated string") }
            advance()
            if c == "'" { return s }
            s.append(c)
        }
    }

    private mutating func array() throws(TOMLError) -> TOMLValue {
        advance()
        var items: [TOMLValue] = []
        while true {
            skipBlank()
            if peek == "]" {
                advance()
                return .array(items)
            }
            items.append(try value())
            skipBlank()
            if peek == "," {
                advance()
            } else if peek != "]" {
                throw fail("expected \",\" or \"]\" in an array")
            }
        }
    }

    private mutating func inlineTable() throws(TOMLError) -> TOMLValue {
        advance()
        var t = TOMLTable()
        skipSpaces()
        if peek == "}" {
            advance()
            return .table(t)
        }
        while true {
            skipSpaces()
            let k = try key()
            skipSpaces()
            guard peek == "=" else { throw fail("expected \"=\" in an inline table") }
            advance()
            skipSpaces()
            let v = try value()
            guard t[k.joined(separator: ".")] == nil else { throw fail("key \(k.joined(separator: ".")) is defined twice") }
            t.set(k.joined(separator: "."), v, line: line)
            skipSpaces()
            if peek == "," {
                advance()
                continue
            }
            guard peek == "}" else { throw fail("expected \",\" or \"}\" in an inline table") }
            advance()
            return .table(t)
        }
    }

    // MARK: Building the tree

    private static func ensureTable(_ root: inout TOMLTable, _ path: [String], line: Int) throws(TOMLError) {
        try modify(&root, path[...], line: line) { (t: inout TOMLTable) throws(TOMLError) in }
    }

    private static func appendTable(_ root: inout TOMLTable, _ path: [String], line: Int) throws(TOMLError) {
        try modifyParent(&root, path, line: line) { (parent: inout TOMLTable, last: String) throws(TOMLError) in
            switch parent[last] {
            case nil: parent.set(last, .array([.table(TOMLTable())]), line: line)
            case var .array(items)?:
                items.append(.table(TOMLTable()))
                parent.set(last, .array(items), line: line)
            case let other?:
                throw TOMLError(line: line, column: 1, message: "\(path.joined(separator: ".")) is already \(other.typeName), not an array of tables")
            }
        }
    }

    private static func assign(_ root: inout TOMLTable, _ table: [String], arrayElement: Bool, _ key: [String], _ v: TOMLValue,
                               line: Int) throws(TOMLError) {
        let full = table + key
        try modifyParent(&root, full, line: line, arrayElementDepth: arrayElement ? table.count : nil) { (parent: inout TOMLTable, last: String) throws(TOMLError) in
            guard parent[last] == nil else {
                throw TOMLError(line: line, column: 1, message: "key \(full.joined(separator: ".")) is defined twice")
            }
            parent.set(last, v, line: line)
        }
    }

    /// Runs `body` on the table at `path`, creating tables on the way; at an array of
    /// tables, the last element is used.
    private static func modify(_ t: inout TOMLTable, _ path: ArraySlice<String>, line: Int,
                               _ body: (inout TOMLTable) throws(TOMLError) -> Void) throws(TOMLError) {
        guard let first = path.first else {
            try body(&t)
            return
        }
        switch t[first] {
        case nil:
            var sub = TOMLTable()
            try modify(&sub, path.dropFirst(), line: line, body)
            t.set(first, .table(sub), line: line)
        case var .table(sub)?:
            try modify(&sub, path.dropFirst(), line: line, body)
            t.set(first, .table(sub), line: t.line(of: first) ?? line)
        case var .array(items)?:
            guard case var .table(last)? = items.last else {
                throw TOMLError(line: line, column: 1, message: "\(first) is an array of values, not of tables")
            }
            try modify(&last, path.dropFirst(), line: line, body)
            items[items.count - 1] = .table(last)
            t.set(first, .array(items), line: t.line(of: first) ?? line)
        case let other?:
            throw TOMLError(line: line, column: 1, message: "\(first) is already \(other.typeName), not a table")
        }
    }

    private static func modifyParent(_ root: inout TOMLTable, _ path: [String], line: Int, arrayElementDepth: Int? = nil,
                                     _ body: (inout TOMLTable, String) throws(TOMLError) -> Void) throws(TOMLError) {
        guard let last = path.last else { return }
        try modify(&root, path.dropLast()[...], line: line) { (parent: inout TOMLTable) throws(TOMLError) in
            try body(&parent, last)
        }
    }
}
