import Foundation
import TandemStore

/// A JSON document as read from a request, kept exact (integers stay integers) so that
/// requests can be checked strictly: unknown fields and wrong types are named in the error.
enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    var typeName: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .integer: "an integer"
        case .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }

    /// Parses a request body (RFC 8259, strictly: one value, no trailing text, no duplicate
    /// keys, at most `JSONReader.maxDepth` levels); the error says what is wrong and where.
    static func parse(_ bytes: [UInt8]) throws(APIError) -> JSONValue {
        guard !bytes.isEmpty else { throw APIError.badRequest("malformed_json", "the request needs a JSON body") }
        var reader = JSONReader(bytes)
        do { return try reader.document() } catch {
            throw APIError.badRequest("malformed_json", "the body is not valid JSON: \(error.reason) at byte \(error.offset)")
        }
    }
}

/// Reads the fields of one JSON object, refusing fields it does not know.
struct FieldReader {
    let fields: [String: JSONValue]
    let path: String

    init(_ value: JSONValue, path: String = "body", allowed: Set<String>) throws(APIError) {
        guard case let .object(o) = value else { throw APIError.badRequest("wrong_type", "\(path) must be a JSON object, found \(value.typeName)") }
        for k in o.keys.sorted() where !allowed.contains(k) {
            throw APIError.badRequest("unknown_field", "\(path) has an unknown field \"\(k)\" (known: \(allowed.sorted().joined(separator: ", ")))")
        }
        fields = o
        self.path = path
    }

    func name(_ key: String) -> String { path == "body" ? key : "\(path).\(key)" }

    func string(_ key: String) throws(APIError) -> String? {
        guard let v = fields[key], v != .null else { return nil }
        guard case let .string(s) = v else { throw APIError.badRequest("wrong_type", "\(name(key)) must be a string, found \(v.typeName)") }
        return s
    }

    func requiredString(_ key: String) throws(APIError) -> String {
        guard let s = try string(key), !s.isEmpty else { throw APIError.badRequest("missing_field", "\(name(key)) is required (a non-empty string)") }
        return s
    }

    func integer(_ key: String) throws(APIError) -> Int64? {
        guard let v = fields[key], v != .null else { return nil }
        guard case let .integer(i) = v else { throw APIError.badRequest("wrong_type", "\(name(key)) must be an integer, found \(v.typeName)") }
        return i
    }

    func array(_ key: String) throws(APIError) -> [JSONValue]? {
        guard let v = fields[key], v != .null else { return nil }
        guard case let .array(a) = v else { throw APIError.badRequest("wrong_type", "\(name(key)) must be an array, found \(v.typeName)") }
        return a
    }
}

extension SQLValue {
    /// A statement parameter from JSON: null, integer, number, string, or
    /// `{"base64": "..."}` for a blob.
    init(json: JSONValue, path: String) throws(APIError) {
        switch json {
        case .null: self = .null
        case let .bool(b): self = .integer(b ? 1 : 0)
        case let .integer(i): self = .integer(i)
        case let .number(d): self = .real(d)
        case let .string(s): self = .text(s)
        case let .object(o):
            guard o.count == 1, case let .string(b64)? = o["base64"], let data = Data(base64Encoded: b64) else {
                throw APIError.badRequest("wrong_type", "\(path) must be null, a number, a string or {\"base64\": \"...\"}")
            }
            self = .blob([UInt8](data))
        case .array:
            throw APIError.badRequest("wrong_type", "\(path) must be null, a number, a string or {\"base64\": \"...\"}, found an array")
        }
    }

    /// The value as JSON (blobs as `{"base64": "..."}`).
    var json: Any {
        switch self {
        case .null: NSNull()
        case let .integer(i): i
        case let .real(d): d.isFinite ? d : NSNull()  // JSON has no infinity or NaN
        case let .text(s): s
        case let .blob(b): ["base64": Data(b).base64EncodedString()]
        }
    }
}
