import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing
import TandemCore
import TandemModel
import Yams
@testable import TandemHTTP
@testable import TandemNode

/// docs/openapi.yaml, and a checker of answers against it: the operation must exist, the
/// status must be documented, and a JSON body must match the documented schema.
struct OpenAPISpec {
    let root: [String: Any]

    init(path: String) throws {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        root = try #require(try Yams.load(yaml: text) as? [String: Any])
    }

    func resolve(_ node: Any) -> Any {
        guard let o = node as? [String: Any], let ref = o["$ref"] as? String, ref.hasPrefix("#/") else { return node }
        var cur: Any = root
        for part in ref.dropFirst(2).split(separator: "/") { cur = (cur as? [String: Any])?[String(part)] ?? [:] }
        return resolve(cur)
    }

    /// (template, method) of every documented operation.
    var operations: [(String, String)] {
        let paths = root["paths"] as? [String: Any] ?? [:]
        return paths.flatMap { path, item in
            ((item as? [String: Any]) ?? [:]).keys.filter { ["get", "post", "head", "options", "put", "delete"].contains($0) }.map { (path, $0) }
        }
    }

    func template(for path: String) -> String? {
        let parts = path.split(separator: "/")
        return (root["paths"] as? [String: Any] ?? [:]).keys.first { t in
            let tp = t.split(separator: "/")
            return tp.count == parts.count && zip(tp, parts).allSatisfy { $0.hasPrefix("{") || $0 == $1 }
        }
    }

    /// What is wrong with this answer according to the document (empty: nothing).
    func check(method: String, path: String, answer: HTTPAnswer) -> [String] {
        guard let t = template(for: path) else { return ["\(path) is not documented"] }
        guard let op = ((root["paths"] as? [String: Any])?[t] as? [String: Any])?[method.lowercased()] as? [String: Any] else {
            return ["\(method) \(t) is not documented"]
        }
        guard let response = (op["responses"] as? [String: Any])?[String(answer.status)].map(resolve) as? [String: Any] else {
            return ["\(method) \(t): status \(answer.status) is not documented"]
        }
        guard method != "HEAD", method != "OPTIONS", let content = response["content"] as? [String: Any] else { return [] }
        let type = (answer.header("Content-Type") ?? "").split(separator: ";").first.map(String.init) ?? ""
        guard let media = content[type] as? [String: Any] ?? (content.count == 1 && type.hasPrefix("application/") && !type.hasSuffix("json") ? content.values.first as? [String: Any] : nil) else {
            return ["\(method) \(t) \(answer.status): content type \(type) is not documented (\(content.keys.sorted()))"]
        }
        guard type == "application/json", let schema = media["schema"] else { return [] }
        do {
            let value = try JSONValue.parse([UInt8](answer.body))
            return validate(value, schema, at: "\(method) \(t) \(answer.status) body")
        } catch {
            return ["\(method) \(t) \(answer.status): body is not JSON"]
        }
    }

    func validate(_ v: JSONValue, _ schemaNode: Any, at path: String) -> [String] {
        guard let s = resolve(schemaNode) as? [String: Any] else { return [] }
        if v == .null { return s["nullable"] as? Bool == true ? [] : ["\(path): null where the schema does not allow it"] }
        if let options = s["oneOf"] as? [Any] {
            return options.contains { validate(v, $0, at: path).isEmpty } ? [] : ["\(path): matches none of oneOf"]
        }
        var problems: [String] = []
        if let e = s["enum"] as? [Any], case let .string(str) = v, !e.contains(where: { ($0 as? String) == str }) {
            problems.append("\(path): \"\(str)\" is not one of \(e)")
        }
        switch (s["type"] as? String, v) {
        case (nil, _), ("string", .string), ("boolean", .bool), ("integer", .integer), ("number", .integer), ("number", .number):
            break
        case let ("array", .array(items)):
            if let itemSchema = s["items"] {
                for (i, item) in items.enumerated() { problems += validate(item, itemSchema, at: "\(path)[\(i)]") }
            }
        case let ("object", .object(fields)):
            for r in s["required"] as? [String] ?? [] where fields[r] == nil { problems.append("\(path): required field \(r) is missing") }
            let props = s["properties"] as? [String: Any] ?? [:]
            for (k, fv) in fields {
                if let ps = props[k] { problems += validate(fv, ps, at: "\(path).\(k)") } else if !props.isEmpty && s["additionalProperties"] as? Bool == false {
                    problems.append("\(path): field \(k) is not documented")
                }
            }
            // An answer's fields must all be documented (clients are generated from this).
            if !props.isEmpty { for k in fields.keys where props[k] == nil { problems.append("\(path): field \(k) is not in the schema") } }
        case let (t?, value):
            problems.append("\(path): expected \(t), found \(value.typeName)")
        }
        return problems
    }
}

@Suite("OpenAPI document", .serialized)
struct OpenAPITests {
    @Test("the running server's answers to every documented call match docs/openapi.yaml, and every documented call is exercised")
    func serverMatchesDocument() async throws {
        let spec = try OpenAPISpec(path: repoRoot + "/docs/openapi.yaml")
        // The checker itself must catch a wrong answer.
        #expect(!spec.check(method: "GET", path: "/status", answer: HTTPAnswer(status: 200, headers: ["Content-Type": "application/json"],
                                                                              body: Data(#"{"site":{}}"#.utf8))).isEmpty)
        #expect(!spec.check(method: "POST", path: "/v1/execute", answer: HTTPAnswer(status: 418, headers: [:], body: Data())).isEmpty)

        let a = try APICluster()
        defer { a.stopAll() }
        try await a.startAll()
        let primary = try await a.ready()
        let replica = try #require(a.c.ids.first { $0 != primary })
        var exercised: Set<String> = []
        var problems: [String] = []
        func go(_ method: String, _ path: String, on site: SiteID? = nil, token: String? = APICluster.admin, json: Any? = nil,
                raw: Data? = nil, headers: [String: String] = [:]) async throws -> HTTPAnswer {
            let answer = try await http(method, a.url(site ?? replica, path), token: token, json: json, raw: raw, headers: headers)
            let bare = String(path.split(separator: "?").first ?? "")
            if let t = spec.template(for: bare) { exercised.insert("\(method.lowercased()) \(t)") }
            problems += spec.check(method: method, path: bare, answer: answer)
            return answer
        }
        for probe in ["/health", "/liveness", "/readiness", "/primary", "/leader", "/read-write", "/replica", "/read-only"] {
            for method in ["GET", "HEAD", "OPTIONS"] {
                _ = try await go(method, probe, token: nil)
                _ = try await go(method, probe, on: primary, token: nil)
            }
        }
        _ = try await go("GET", "/replica?lag=16MB", token: nil)
        _ = try await go("GET", "/read-only?lag=2s", token: nil)
        _ = try await go("GET", "/status", token: nil)
        _ = try await go("GET", "/status", on: primary, token: nil)
        _ = try await go("GET", "/metrics", token: nil)
        _ = try await go("POST", "/v1/execute", json: ["statements": [["sql": "INSERT INTO patients (reference) VALUES (?)", "params": ["P-1"]]]])
        _ = try await go("POST", "/v1/execute", json: ["statements": [["sql": "SELEC nothing"]]])
        _ = try await go("POST", "/v1/execute", token: nil, json: ["statements": [["sql": "SELECT 1"]]])
        _ = try await go("POST", "/v1/query", json: ["sql": "SELECT reference, 1.5, NULL, x'00ff' FROM patients", "consistency": "local"])
        _ = try await go("POST", "/v1/query", json: ["sql": "SELECT count(*) FROM patients"])
        let booked = try await go("POST", "/v1/appointments", json: ["practitioner": "DR-1", "patient": "P-1", "starts_at": "2026-03-10T09:00:00Z",
                                                                     "duration_minutes": 30, "mode": "phone"])
        _ = try await go("POST", "/v1/appointments", json: ["practitioner": "DR-1", "patient": "P-2", "starts_at": "2026-03-10T09:10:00Z",
                                                            "duration_minutes": 30])
        let id = booked.json["id"] as? Int ?? 0
        _ = try await go("GET", "/v1/appointments?practitioner=DR-1&day=2026-03-10")
        _ = try await go("GET", "/v1/appointments?patient=P-1&consistency=local")
        _ = try await go("POST", "/v1/appointments/\(id)/reschedule", json: ["starts_at": "2026-03-10T10:00:00Z", "duration_minutes": 20])
        _ = try await go("POST", "/v1/appointments/\(id)/cancel")
        _ = try await go("POST", "/v1/appointments/\(id)/cancel")
        _ = try await go("POST", "/v1/appointments/424242/reschedule", json: ["starts_at": "2026-03-10T10:00:00Z"])
        let doc = try await go("POST", "/v1/documents", raw: Data("a report".utf8),
                               headers: ["Content-Type": "application/pdf", "Tandem-Patient": "P-1", "Tandem-Document-Kind": "report"])
        _ = try await go("POST", "/v1/documents", raw: Data("x".utf8), headers: ["Tandem-Patient": "P-1", "Tandem-Appointment": "999"])
        _ = try await go("GET", "/v1/documents/\(doc.json["id"] as? Int ?? 0)")
        _ = try await go("GET", "/v1/documents/31337")
        _ = try await go("GET", "/v1/documents?patient=P-1")
        _ = try await go("GET", "/v1/export/appointments?day=2026-03-10&format=csv")
        _ = try await go("GET", "/v1/export/appointments?day=2026-03-10")
        _ = try await go("GET", "/v1/admin/state-hash")
        _ = try await go("POST", "/v1/admin/switchover", json: ["to": "nowhere"])
        let moved = try await go("POST", "/v1/admin/switchover", json: ["to": replica.name])
        #expect(moved.status == 200, "\(String(decoding: moved.body, as: UTF8.self))")

        #expect(problems.isEmpty, "\(problems.joined(separator: "\n"))")
        let documented = Set(spec.operations.map { "\($0.1) \($0.0)" })
        #expect(documented.subtracting(exercised).isEmpty, "documented but not exercised: \(documented.subtracting(exercised).sorted())")
    }
}
