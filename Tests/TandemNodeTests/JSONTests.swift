import Foundation
import Testing
import TandemModel
@testable import TandemStore
@testable import TandemHTTP

/// A random JSON value (as Foundation objects) for differential tests.
private func randomJSON(_ g: inout SeededRandom, depth: Int = 0) -> Any {
    let strings = ["", "visit", "Dr. Müller", "rdv \"urgent\"", "a\\b/c", "tab\there\nline", "😀 emoji", "\u{1}\u{1f}", "日本"]
    switch g.next() % (depth > 3 ? 5 : 7) {
    case 0: return NSNull()
    case 1: return g.next() % 2 == 0
    case 2: return Int64(bitPattern: g.next()) >> (g.next() % 64)
    case 3: return Double(Int64(bitPattern: g.next()) >> 20) / 1024
    case 4: return strings[Int(g.next() % UInt64(strings.count))]
    case 5: return (0..<Int(g.next() % 5)).map { _ in randomJSON(&g, depth: depth + 1) }
    default:
        var o: [String: Any] = [:]
        for k in 0..<Int(g.next() % 5) { o["k\(k)-\(g.next() % 100)"] = randomJSON(&g, depth: depth + 1) }
        return o
    }
}

/// Compares what JSONReader read with what JSONSerialization read from the same text.
private func same(_ v: JSONValue, _ f: Any) -> Bool {
    switch v {
    case .null: return f is NSNull
    case let .bool(b): return (f as? Bool) == b
    case let .integer(i):
        if let n = f as? Int64 { return n == i }
        if let n = f as? Int { return Int64(n) == i }
        if let d = f as? Double { return d == Double(i) && d.rounded() == d }
        return false
    case let .number(d):
        // JSONSerialization may hand back an NSNumber or a Decimal: compare the values.
        if let x = f as? Double, x == d { return true }
        guard let n = f as? NSNumber else { return false }
        return abs(n.doubleValue - d) <= 1e-12 * abs(d)
    case let .string(s): return (f as? String) == s
    case let .array(a):
        guard let fa = f as? [Any], fa.count == a.count else { return false }
        return zip(a, fa).allSatisfy { same($0, $1) }
    case let .object(o):
        guard let fo = f as? [String: Any], fo.count == o.count else { return false }
        return o.allSatisfy { k, v in fo[k].map { same(v, $0) } ?? false }
    }
}

@Suite("JSON reading and writing")
struct JSONTests {
    @Test("the reader reads what JSONSerialization writes, and JSONSerialization reads what the writer writes (2,000 random documents)")
    func differential() throws {
        var g = SeededRandom(seed: 42)
        for _ in 0..<2_000 {
            let doc: [String: Any] = ["v": randomJSON(&g)]
            let text = try JSONSerialization.data(withJSONObject: doc)
            let read = try JSONValue.parse([UInt8](text))
            let reference = try JSONSerialization.jsonObject(with: text, options: [.fragmentsAllowed])
            #expect(same(read, reference), "\(String(decoding: text, as: UTF8.self))")

            var w = JSONWriter()
            let wrote = w.write(doc)
            #expect(wrote)
            let back = try JSONSerialization.jsonObject(with: Data(w.bytes))
            let again = try JSONValue.parse(w.bytes)
            #expect(same(again, back), "\(String(decoding: w.bytes, as: UTF8.self))")
            #expect(same(again, reference), "the writer keeps the value: \(String(decoding: w.bytes, as: UTF8.self))")
        }
    }

    @Test("integers stay exact: 64-bit bounds, whole numbers as integers, the rest as doubles")
    func numbers() throws {
        #expect(try JSONValue.parse(Array("9223372036854775807".utf8)) == .integer(.max))
        #expect(try JSONValue.parse(Array("-9223372036854775808".utf8)) == .integer(.min))
        #expect(try JSONValue.parse(Array("9223372036854775808".utf8)) == .number(9223372036854775808))
        #expect(try JSONValue.parse(Array("-9223372036854775809".utf8)) == .number(-9.223372036854775808e18), "not clamped to Int64.min")
        #expect(try JSONValue.parse(Array("9007199254740993.0".utf8)) == .number(9.007199254740992e15), "from 2^53 on, a double is not exact")
        #expect(try JSONValue.parse(Array("2.0".utf8)) == .integer(2))
        #expect(try JSONValue.parse(Array("1e2".utf8)) == .integer(100))
        #expect(try JSONValue.parse(Array("-0.5".utf8)) == .number(-0.5))
        #expect(try JSONValue.parse(Array(" [ 1 , 2.5e-3 ] ".utf8)) == .array([.integer(1), .number(0.0025)]))
    }

    @Test("strings: escapes, surrogate pairs and UTF-8 are decoded")
    func strings() throws {
        let text = #"{"a":"line\nTab\t\"q\" \\ \/ \u00e9 \ud83d\ude00 é"}"#
        #expect(try JSONValue.parse(Array(text.utf8)) == .object(["a": .string("line\nTab\t\"q\" \\ / é 😀 é")]))
    }

    @Test("malformed bodies are refused with what is wrong and where, never read halfway", arguments: [
        ("{\"a\":1", "ends inside an object"),
        ("{\"a\":1} x", "unexpected text after the value"),
        ("[01]", "leading zero"),
        ("[1.]", "a fraction needs digits"),
        ("[1e]", "an exponent needs digits"),
        ("[-]", "a number needs digits"),
        ("[\"a\u{1}\"]", "control character"),
        ("[\"\\x\"]", "unknown escape"),
        ("[\"\\ud83d\"]", "unpaired surrogate"),
        ("[\"\\ude00\"]", "unpaired surrogate"),
        ("[\"\\u12\"]", "four hexadecimal digits"),
        ("{\"a\":1,\"a\":2}", "appears twice"),
        ("[tru]", "unknown literal"),
        ("[NaN]", "unexpected character"),
        ("[1e999]", "out of range"),
        ("{a:1}", "expected a quoted key"),
        ("[1 2]", "expected ',' or ']'"),
        (String(repeating: "[", count: 65) + String(repeating: "]", count: 65), "nested deeper than 64"),
    ])
    func malformed(_ text: String, _ reason: String) {
        #expect {
            _ = try JSONValue.parse(Array(text.utf8))
        } throws: { error in
            guard let e = error as? APIError else { return false }
            return e.code == "malformed_json" && e.message.contains(reason)
        }
    }

    @Test("a body of ten million values is refused while it is read, naming the limit")
    func tooManyValues() {
        let text = "{\"statements\":[{\"sql\":\"x\",\"params\":[" + String(repeating: "0,", count: 10_000_000) + "0]}]}"
        #expect {
            _ = try JSONValue.parse(Array(text.utf8))
        } throws: { error in
            (error as? APIError).map { $0.code == "malformed_json" && $0.message.contains("more than 262144 values") } ?? false
        }
    }

    @Test("the largest batch the store takes (256 statements of 999 parameters) is within the reader's value limit")
    func largestBatchFits() throws {
        let statement = "{\"sql\":\"INSERT INTO kv VALUES (?)\",\"params\":[" + Array(repeating: "1", count: 999).joined(separator: ",") + "]}"
        let body = "{\"statements\":[" + Array(repeating: statement, count: 256).joined(separator: ",") + "]}"
        _ = try JSONValue.parse(Array(body.utf8))
    }

    @Test("invalid UTF-8 inside a string is refused")
    func invalidUTF8() {
        #expect(throws: APIError.self) { _ = try JSONValue.parse([0x22, 0xC3, 0x28, 0x22]) }
    }

    @Test("random damage to valid bodies never crashes the reader (20,000 mutations)")
    func mutations() throws {
        var g = SeededRandom(seed: 7)
        var refused = 0
        for _ in 0..<20_000 {
            let doc: [String: Any] = ["statements": [["sql": "INSERT INTO kv VALUES (?, ?)", "params": [randomJSON(&g), randomJSON(&g)]]]]
            var bytes = [UInt8](try JSONSerialization.data(withJSONObject: doc))
            for _ in 0...(g.next() % 3) {
                let at = Int(g.next() % UInt64(bytes.count))
                switch g.next() % 3 {
                case 0: bytes[at] = UInt8(truncatingIfNeeded: g.next())
                case 1: bytes.remove(at: at)
                default: bytes = Array(bytes[..<at])
                }
                if bytes.isEmpty { bytes = [0x20] }
            }
            do { _ = try JSONValue.parse(bytes) } catch { refused += 1 }
        }
        #expect(refused > 10_000, "most damaged bodies are refused (\(refused))")
    }

    @Test("a write's answer written without casts equals the generic writer's, byte for byte (2,000 random executions)")
    func executionAnswer() throws {
        var g = SeededRandom(seed: 0xe7ec)
        let texts = ["", "visit", "Dr. Müller", "rdv \"urgent\"", "a\\b/c", "tab\there\nline", "😀 emoji", "\u{1}\u{1f}", "日本"]
        let reals: [Double] = [0, -0.0, 1.5, -2, 1e15, 1e14, 123456789.25, .nan, .infinity, -.infinity, 1e-300, 3.0e20]
        func value() -> SQLValue {
            switch g.next() % 6 {
            case 0: .null
            case 1: .integer(Int64(bitPattern: g.next()) >> (g.next() % 64))
            case 2: .real(g.next() % 2 == 0 ? reals[Int(g.next() % UInt64(reals.count))] : Double(Int64(bitPattern: g.next()) >> 20) / 1024)
            case 3: .text(texts[Int(g.next() % UInt64(texts.count))])
            case 4: .blob((0..<Int(g.next() % 40)).map { _ in UInt8(truncatingIfNeeded: g.next()) })
            default: .integer(Int64(g.next() % 1000))
            }
        }
        for _ in 0..<2_000 {
            let results: [StatementResult] = (0..<Int(g.next() % 4)).map { _ in
                let columns = (0..<Int(g.next() % 4)).map { "c\($0)" + texts[Int(g.next() % UInt64(texts.count))] }
                let rows = columns.isEmpty ? [] : (0..<Int(g.next() % 4)).map { _ in columns.map { _ in value() } }
                return StatementResult(rowsAffected: Int64(g.next() % 100), lastInsertRowID: Int64(bitPattern: g.next()) >> 8,
                                       columns: columns, rows: rows)
            }
            let e = Execution(record: LogRecord(term: Term(g.next() % 9 + 1), lsn: LSN(g.next() >> 1), kind: .changeset, payload: []),
                              results: results)
            var writer = JSONWriter()
            writer.execution(e)
            let generic = executionAnswerThroughAny(e)
            #expect(writer.bytes == generic, "\(String(decoding: writer.bytes, as: UTF8.self)) != \(String(decoding: generic, as: UTF8.self))")
            if writer.bytes != generic { return }
        }
    }

    @Test("the writer escapes control characters, sorts keys, and writes whole doubles as integers")
    func writer() {
        var w = JSONWriter()
        let wrote = w.write(["b": [1, 2.5, 3.0, NSNull(), true], "a": "x\u{1}\"\\/\n"] as [String: Any])
        #expect(wrote)
        #expect(String(decoding: w.bytes, as: UTF8.self) == #"{"a":"x\u0001\"\\/\n","b":[1,2.5,3,null,true]}"#)
        var bad = JSONWriter()
        let wroteNaN = bad.write(["d": Double.nan])
        #expect(!wroteNaN, "NaN is not JSON: the caller falls back")
    }
}
