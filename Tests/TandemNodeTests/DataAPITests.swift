import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing
import TandemCore
import TandemHTTP
import TandemModel
import TandemStore
import TandemTransport
@testable import TandemNode

/// An HTTP answer as a test sees it.
struct HTTPAnswer {
    var status: Int
    var headers: [String: String]
    var body: Data
    var json: [String: Any] { (try? JSONSerialization.jsonObject(with: body)) as? [String: Any] ?? [:] }
    var errorCode: String? { (json["error"] as? [String: Any])?["code"] as? String }
    func header(_ name: String) -> String? { headers.first { $0.key.lowercased() == name.lowercased() }?.value }
}

func http(_ method: String, _ url: String, token: String? = nil, json: Any? = nil, raw: Data? = nil,
          headers: [String: String] = [:]) async throws -> HTTPAnswer {
    var request = URLRequest(url: URL(string: url)!)
    request.httpMethod = method
    request.timeoutInterval = 20
    if let token { request.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization") }
    if let json {
        request.httpBody = try JSONSerialization.data(withJSONObject: json)
        request.setValue("application/json", forHTTPHeaderField: "Content-Type")
    }
    if let raw { request.httpBody = raw }
    for (k, v) in headers { request.setValue(v, forHTTPHeaderField: k) }
    let (data, response) = try await URLSession.shared.data(for: request)
    let r = response as? HTTPURLResponse
    var h: [String: String] = [:]
    for (k, v) in r?.allHeaderFields ?? [:] { h["\(k)"] = "\(v)" }
    return HTTPAnswer(status: r?.statusCode ?? 0, headers: h, body: data)
}

/// Three sites on loopback, each with the data API on its own HTTP port.
final class APICluster: @unchecked Sendable {
    let c: TestCluster
    var http: [SiteID: Int] = [:]
    var servers: [SiteID: Task<Void, Never>] = [:]
    let tokens = TokenStore(entries: [:])
    static let writer = "tdm_writer-token", reader = "tdm_reader-token", admin = "tdm_admin-token"
    var waitForPrimaryMilliseconds: UInt32 = 6_000
    var maxCallsInFlight = 512
    var bodyIdleMilliseconds: UInt32 = 30_000
    var idleConnectionMilliseconds: UInt32 = 120_000
    var maxDocumentBytes = 2 << 20
    var maxForwardedAnswerBytes = 30 << 20

    init() throws {
        c = try TestCluster()
        c.configure = {
            $0.snapshotEveryRecords = 0
            $0.schemaMigrations = TelehealthSchema.migrations
        }
    }

    func tokenStore() throws -> TokenStore {
        let path = c.dir + "/tokens"
        let lines = [TokenStore.line(name: "app", scope: .write, token: Self.writer),
                     TokenStore.line(name: "viewer", scope: .read, token: Self.reader),
                     TokenStore.line(name: "ops", scope: .admin, token: Self.admin)]
        try (lines.joined(separator: "\n") + "\n").write(toFile: path, atomically: true, encoding: .utf8)
        return try TokenStore(path: path)
    }

    func start(_ id: SiteID) async throws {
        try c.start(id)
        let runtime = try #require(c.runtimes[id])
        var settings = DataAPISettings(site: id)
        settings.waitForPrimaryMilliseconds = waitForPrimaryMilliseconds
        settings.maxBodyBytes = max(4 << 20, maxDocumentBytes + (64 << 10))
        settings.maxDocumentBytes = maxDocumentBytes
        settings.maxCallsInFlight = maxCallsInFlight
        settings.bodyIdleMilliseconds = bodyIdleMilliseconds
        settings.idleConnectionMilliseconds = idleConnectionMilliseconds
        settings.maxForwardedAnswerBytes = maxForwardedAnswerBytes
        let api = DataAPI(runtime: runtime, settings: settings, tokens: try tokenStore())
        let port = try http[id] ?? Int(Transport.freeLoopbackPort())
        http[id] = port
        let router = makeRouter(runtime: runtime, site: id, defaultLag: LagThreshold(records: 1000), sites: c.config.sites,
                                metrics: api.metrics)
        servers[id] = Task { try? await runHTTP(router: router, api: api, host: "127.0.0.1", port: port) }
        for _ in 0..<200 {
            if (try? await httpStatus("GET", url(id, "/liveness"))) == 200 { return }
            try await Task.sleep(for: .milliseconds(50))
        }
        Issue.record("the HTTP server of \(id) did not come up")
    }

    func url(_ id: SiteID, _ path: String) -> String { "http://127.0.0.1:\(http[id]!)\(path)" }

    func startAll() async throws {
        for id in c.ids { try await start(id) }
    }

    /// The primary once its schema migration committed.
    func ready() async throws -> SiteID {
        let deadline = Date().addingTimeInterval(15)
        while Date() < deadline {
            if let p = c.primary(), p.status.commitLSN >= LSN(1), p.storage.store.schemaVersion == TelehealthSchema.latestVersion,
               p.status.appliedLSN <= p.status.commitLSN {
                return p.settings.site
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw WriteError.stopped
    }

    func stopAll() {
        for s in servers.values { s.cancel() }
        for id in c.ids { c.stop(id) }
        c.cleanup()
    }
}

@Suite("The data API", .serialized)
struct DataAPITests {
    @Test("a write through a replica is forwarded to the primary, and read back with min_lsn on a third site and linearizably everywhere")
    func forwardedWrite() async throws {
        let a = try APICluster()
        // Lowered from 30 MiB so that the answer too large to forward, below, stays light.
        a.maxForwardedAnswerBytes = 1 << 20
        defer { a.stopAll() }
        try await a.startAll()
        let primary = try await a.ready()
        let replicas = a.c.ids.filter { $0 != primary }
        let w = try await http("POST", a.url(replicas[0], "/v1/execute"), token: APICluster.writer, json: [
            "statements": [["sql": "INSERT INTO patients (reference) VALUES (?)", "params": ["PAT-0001"]],
                           ["sql": "INSERT INTO practitioners (reference, name) VALUES (?, ?)", "params": ["DR-1", "Dr Martin"]]],
        ])
        #expect(w.status == 200, "\(String(decoding: w.body, as: UTF8.self))")
        #expect(w.header("Tandem-Served-By") == primary.name)
        let lsn = try #require(w.json["lsn"] as? Int)
        #expect(w.header("Tandem-LSN") == String(lsn))
        let results = try #require(w.json["results"] as? [[String: Any]])
        #expect(results.count == 2 && results[0]["rows_affected"] as? Int == 1)

        let r = try await http("POST", a.url(replicas[1], "/v1/query"), token: APICluster.reader, json: [
            "sql": "SELECT reference FROM patients", "consistency": "local", "min_lsn": lsn,
        ])
        #expect(r.status == 200, "\(String(decoding: r.body, as: UTF8.self))")
        #expect((r.json["rows"] as? [[Any]])?.first?.first as? String == "PAT-0001")
        #expect((r.json["lsn"] as? Int ?? 0) >= lsn)
        for id in a.c.ids {
            let q = try await http("POST", a.url(id, "/v1/query"), token: APICluster.reader,
                                   json: ["sql": "SELECT count(*) FROM practitioners WHERE reference = ?", "params": ["DR-1"]])
            #expect(q.status == 200, "linearizable read on \(id): \(String(decoding: q.body, as: UTF8.self))")
            #expect((q.json["rows"] as? [[Any]])?.first?.first as? Int == 1, "linearizable read on \(id) sees the write")
        }

        // A forwarded write whose answer cannot travel between sites (over the limit, 1 MiB
        // in these tests, once in JSON) committed: it must say so, never "refused", or its
        // client sends it again.
        let big = ["sql": "SELECT zeroblob(600000), zeroblob(600000)"]
        let large = try await http("POST", a.url(replicas[0], "/v1/execute"), token: APICluster.writer, json: [
            "statements": [["sql": "INSERT INTO patients (reference) VALUES (?)", "params": ["PAT-BIG"]], big],
        ])
        #expect(large.status == 200, "\(String(decoding: large.body.prefix(300), as: UTF8.self))")
        #expect(large.json["committed"] as? Bool == true && large.header("Tandem-LSN") != nil)
        let once = try await http("POST", a.url(primary, "/v1/query"), token: APICluster.reader,
                                  json: ["sql": "SELECT count(*) FROM patients WHERE reference = 'PAT-BIG'"])
        #expect((once.json["rows"] as? [[Any]])?.first?.first as? Int == 1)
        // A read that large was not carried out as far as its client knows: 413.
        let read = try await http("POST", a.url(replicas[0], "/v1/query"), token: APICluster.reader, json: big)
        #expect(read.status == 413 && read.errorCode == "too_large", "\(String(decoding: read.body.prefix(300), as: UTF8.self))")
    }

    @Test("appointments: book (409 on an overlapping slot), list by practitioner and day or by patient, cancel, reschedule; documents up and down with their sha256")
    func telehealthResources() async throws {
        let a = try APICluster()
        defer { a.stopAll() }
        try await a.startAll()
        let primary = try await a.ready()
        let replica = try #require(a.c.ids.first { $0 != primary })
        let third = try #require(a.c.ids.first { $0 != primary && $0 != replica })
        func book(_ start: String, _ minutes: Int, patient: String = "PAT-1", on site: SiteID? = nil) async throws -> HTTPAnswer {
            try await http("POST", a.url(site ?? replica, "/v1/appointments"), token: APICluster.writer, json: [
                "practitioner": "DR-NEURO", "practitioner_name": "Dr Weber", "patient": patient, "starts_at": start,
                "duration_minutes": minutes, "mode": "video",
            ])
        }
        let first = try await book("2026-03-10T09:00:00Z", 30)
        #expect(first.status == 201, "\(String(decoding: first.body, as: UTF8.self))")
        let id = try #require(first.json["id"] as? Int)
        let overlapping = try await book("2026-03-10T09:15:00Z", 30, patient: "PAT-2", on: third)
        #expect(overlapping.status == 409 && overlapping.errorCode == "slot_taken")
        let adjacent = try await book("2026-03-10T09:30:00Z", 30, patient: "PAT-2")
        #expect(adjacent.status == 201)
        let lsn = try #require(adjacent.json["lsn"] as? Int)

        let day = try await http("GET", a.url(third, "/v1/appointments?practitioner=DR-NEURO&day=2026-03-10&consistency=local&min_lsn=\(lsn)"),
                                 token: APICluster.reader)
        #expect(day.status == 200)
        #expect((day.json["appointments"] as? [[String: Any]])?.map { $0["patient"] as? String } == ["PAT-1", "PAT-2"])
        #expect((day.json["appointments"] as? [[String: Any]])?.first?["booked_at_site"] as? String == replica.name,
                "the booking records the site the clinician used, not the primary that executed it")
        let byPatient = try await http("GET", a.url(third, "/v1/appointments?patient=PAT-1"), token: APICluster.reader)
        #expect((byPatient.json["appointments"] as? [[String: Any]])?.count == 1)

        // Rescheduling onto the other booking is refused; to a free slot it works.
        let clash = try await http("POST", a.url(replica, "/v1/appointments/\(id)/reschedule"), token: APICluster.writer,
                                   json: ["starts_at": "2026-03-10T09:45:00Z"])
        #expect(clash.status == 409 && clash.errorCode == "slot_taken")
        let moved = try await http("POST", a.url(replica, "/v1/appointments/\(id)/reschedule"), token: APICluster.writer,
                                   json: ["starts_at": "2026-03-10T11:00:00Z"])
        #expect(moved.status == 200)
        let cancel = try await http("POST", a.url(third, "/v1/appointments/\(id)/cancel"), token: APICluster.writer)
        #expect(cancel.status == 200)
        let again = try await http("POST", a.url(third, "/v1/appointments/\(id)/cancel"), token: APICluster.writer)
        #expect(again.status == 409 && again.errorCode == "not_booked")
        let missing = try await http("POST", a.url(third, "/v1/appointments/99999/cancel"), token: APICluster.writer)
        #expect(missing.status == 404)
        // The freed slot can be booked again.
        #expect(try await book("2026-03-10T11:00:00Z", 20, patient: "PAT-3").status == 201)

        // A document up through one replica, down from another, checked both ways.
        var document = [UInt8](repeating: 0, count: 1 << 20)
        var g = SeededRandom(seed: 7)
        for i in document.indices { document[i] = UInt8(truncatingIfNeeded: g.next()) }
        let sha = SHA256Hasher.hex(SHA256Hasher.digest(document))
        let up = try await http("POST", a.url(replica, "/v1/documents"), token: APICluster.writer, raw: Data(document), headers: [
            "Content-Type": "application/pdf", "Tandem-Patient": "PAT-1", "Tandem-Document-Kind": "report", "Tandem-SHA256": sha,
        ])
        #expect(up.status == 201, "\(String(decoding: up.body, as: UTF8.self))")
        #expect(up.json["sha256"] as? String == sha)
        let docID = try #require(up.json["id"] as? Int)
        let down = try await http("GET", a.url(third, "/v1/documents/\(docID)"), token: APICluster.reader)
        #expect(down.status == 200)
        #expect([UInt8](down.body) == document)
        #expect(down.header("Tandem-SHA256") == sha)
        #expect(down.header("Content-Type") == "application/pdf")
        let damaged = try await http("POST", a.url(replica, "/v1/documents"), token: APICluster.writer, raw: Data(document), headers: [
            "Tandem-Patient": "PAT-1", "Tandem-SHA256": String(repeating: "0", count: 64),
        ])
        #expect(damaged.status == 400 && damaged.errorCode == "checksum_mismatch")
        let tooBig = try await http("POST", a.url(replica, "/v1/documents"), token: APICluster.writer,
                                    raw: Data(count: 3 << 20), headers: ["Tandem-Patient": "PAT-1"])
        #expect(tooBig.status == 413)
        let list = try await http("GET", a.url(primary, "/v1/documents?patient=PAT-1"), token: APICluster.reader)
        #expect((list.json["documents"] as? [[String: Any]])?.count == 1)

        // The export works on any site, as CSV.
        let csv = try await http("GET", a.url(third, "/v1/export/appointments?day=2026-03-10&practitioner=DR-NEURO&format=csv"),
                                 token: APICluster.reader)
        #expect(csv.status == 200)
        let lines = String(decoding: csv.body, as: UTF8.self).split(separator: "\r\n")
        #expect(lines.first?.hasPrefix("id,practitioner,patient,starts_at") == true)
    }

    @Test("bad input is refused with the fitting status and code, and changes nothing")
    func badInput() async throws {
        let a = try APICluster()
        defer { a.stopAll() }
        try await a.startAll()
        let primary = try await a.ready()
        let site = try #require(a.c.ids.first { $0 != primary })
        let before = try await http("GET", a.url(primary, "/v1/admin/state-hash"), token: APICluster.reader)
        #expect(before.status == 200)

        func post(_ path: String, token: String? = APICluster.writer, raw: String? = nil, json: Any? = nil,
                  headers: [String: String] = [:]) async throws -> HTTPAnswer {
            try await http("POST", a.url(site, path), token: token, json: json, raw: raw.map { Data($0.utf8) },
                           headers: (raw == nil ? [:] : ["Content-Type": "application/json"]).merging(headers) { _, new in new })
        }
        let cases: [(HTTPAnswer, Int, String)] = [
            (try await post("/v1/execute", raw: "{\"statements\": [ {\"sql\": "), 400, "malformed_json"),
            (try await post("/v1/execute", json: ["statements": [["sql": "DELETE FROM patients"]], "atomic": true]), 400, "unknown_field"),
            (try await post("/v1/execute", json: ["statements": [["sql": 42]]]), 400, "wrong_type"),
            (try await post("/v1/execute", json: ["statements": "DELETE FROM patients"]), 400, "wrong_type"),
            (try await post("/v1/execute", json: ["statements": [["sql": "DELETE FROM patients"], ["sql": "INSERT INTO nowhere VALUES (1)"]]]), 400, "sql_error"),
            (try await post("/v1/execute", json: ["statements": [["sql": "INSERT INTO practitioners (reference) VALUES ('x')"]]]), 409, "constraint"),
            (try await post("/v1/execute", raw: String(repeating: " ", count: 5 << 20)), 413, "too_large"),
            // Headers a call carries to the primary are bounded, whichever site takes it.
            (try await post("/v1/execute", json: ["statements": [["sql": "DELETE FROM patients"]]],
                            headers: ["Tandem-Patient": String(repeating: "p", count: 1025)]), 431, "header_too_large"),
            (try await post("/v1/execute", raw: "{\"statements\": [{\"sql\": \"DELETE FROM patients\"}]}",
                            headers: ["Content-Type": "application/json; " + String(repeating: "x", count: 250)]), 400, "bad_header"),
            (try await post("/v1/query", json: ["sql": "SELECT 1", "consistency": "eventual"]), 400, "bad_value"),
            // A runaway query is interrupted (the site's loop is not held).
            (try await post("/v1/query", json: ["sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
                                                "consistency": "local"]), 400, "statement_timeout"),
            (try await post("/v1/execute", json: ["statements": [["sql": "INSERT INTO patients (reference) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT 'P' || x FROM c"]]]), 400, "statement_timeout"),
            (try await post("/v1/query", json: ["sql": "SELECT 1e999", "consistency": "local"]), 200, ""),
            (try await post("/v1/execute", token: nil, json: ["statements": [["sql": "DELETE FROM patients"]]]), 401, "unauthorized"),
            (try await post("/v1/execute", token: "tdm_not-a-token", json: ["statements": [["sql": "DELETE FROM patients"]]]), 401, "unauthorized"),
            (try await post("/v1/execute", token: APICluster.reader, json: ["statements": [["sql": "DELETE FROM patients"]]]), 403, "forbidden"),
            // Blanks between "Bearer" and the token are not part of it: still the reader.
            (try await post("/v1/execute", token: " \t" + APICluster.reader, json: ["statements": [["sql": "DELETE FROM patients"]]]), 403, "forbidden"),
            (try await post("/v1/execute", token: APICluster.reader + "x", json: ["statements": [["sql": "DELETE FROM patients"]]]), 401, "unauthorized"),
            (try await post("/v1/admin/switchover", json: ["to": primary.name]), 403, "forbidden"),
            (try await post("/v1/nothing-here", json: [:]), 404, "not_found"),
            (try await post("/v1/appointments", json: ["practitioner": "DR", "patient": "P", "starts_at": "tomorrow", "duration_minutes": 30]), 400, "bad_value"),
        ]
        for (i, (answer, status, code)) in cases.enumerated() {
            #expect(answer.status == status, "case \(i): \(String(decoding: answer.body, as: UTF8.self))")
            if status != 200 { #expect(answer.errorCode == code, "case \(i): \(String(decoding: answer.body, as: UTF8.self))") }
        }
        let after = try await http("GET", a.url(primary, "/v1/admin/state-hash"), token: APICluster.reader)
        #expect(after.json["state_hash"] as? String == before.json["state_hash"] as? String, "nothing was applied")
        #expect(after.json["lsn"] as? Int == before.json["lsn"] as? Int)
    }

    @Test("a site cut off from the majority serves local reads marked stale and exports, and refuses writes with 503 and Retry-After")
    func degradedSite() async throws {
        let a = try APICluster()
        a.waitForPrimaryMilliseconds = 1_500
        defer { a.stopAll() }
        try await a.startAll()
        let primary = try await a.ready()
        let booked = try await http("POST", a.url(primary, "/v1/appointments"), token: APICluster.writer, json: [
            "practitioner": "DR-1", "patient": "PAT-1", "starts_at": "2026-03-10T08:00:00Z", "duration_minutes": 20,
        ])
        #expect(booked.status == 201)
        let lsn = try #require(booked.json["lsn"] as? Int)
        let survivor = try #require(a.c.ids.first { $0 != primary })
        // Its copy has the booking before the others go.
        let seen = try await http("POST", a.url(survivor, "/v1/query"), token: APICluster.reader,
                                  json: ["sql": "SELECT count(*) FROM appointments", "consistency": "local", "min_lsn": lsn])
        #expect(seen.status == 200)
        for id in a.c.ids where id != survivor { a.c.stop(id) }
        try await Task.sleep(for: .milliseconds(1500))

        let local = try await http("POST", a.url(survivor, "/v1/query"), token: APICluster.reader,
                                   json: ["sql": "SELECT count(*) FROM appointments", "consistency": "local"])
        #expect(local.status == 200)
        #expect(local.header("Tandem-Stale") == "true")
        #expect(local.json["stale"] as? Bool == true)
        #expect((local.json["rows"] as? [[Any]])?.first?.first as? Int == 1)
        let export = try await http("GET", a.url(survivor, "/v1/export/appointments?day=2026-03-10&format=json"), token: APICluster.reader)
        #expect(export.status == 200)
        #expect((export.json["appointments"] as? [[String: Any]])?.count == 1)
        let started = Date()
        let write = try await http("POST", a.url(survivor, "/v1/execute"), token: APICluster.writer,
                                   json: ["statements": [["sql": "INSERT INTO patients (reference) VALUES ('PAT-9')"]]])
        #expect(write.status == 503 && write.errorCode == "no_primary")
        #expect(write.header("Retry-After") == "1")
        #expect(Date().timeIntervalSince(started) >= 1.4, "the write waited for a primary before giving up")
        let status = try await http("GET", a.url(survivor, "/status"))
        #expect((status.json["site"] as? [String: Any])?["degraded"] as? Bool == true)
        let metrics = try await http("GET", a.url(survivor, "/metrics"))
        let text = String(decoding: metrics.body, as: UTF8.self)
        #expect(text.contains("tandem_degraded 1"))
        #expect(text.contains("tandem_term "))
        #expect(text.contains("tandem_peer_timeouts_total{peer="))
    }
}

@Suite("Tokens, lag thresholds and role-change hooks")
struct OperatorPartsTests {
    @Test("the token file holds hashes; a known token maps to its scope, anything else to nothing; bad lines name their line")
    func tokenFile() throws {
        let dir = NSTemporaryDirectory() + "tandem-tokens-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let token = TokenStore.generate()
        let path = dir + "/tokens"
        try ("# comment\n" + TokenStore.line(name: "portal", scope: .write, token: token) + "\n").write(toFile: path, atomically: true, encoding: .utf8)
        let store = try TokenStore(path: path)
        #expect(store.entry(forToken: token)?.scope == .write)
        #expect(store.entry(forToken: token + "x") == nil)
        #expect(try String(contentsOfFile: path, encoding: .utf8).contains(token) == false, "the file never holds the token itself")
        try "portal write \(token)\n".write(toFile: path, atomically: true, encoding: .utf8)
        do {
            try store.reload()
            Issue.record("accepted a token in clear")
        } catch {
            #expect(error.line == 1)
            #expect(error.reason.contains("never the token itself"))
        }
        #expect(store.entry(forToken: token)?.scope == .write, "a failed reload keeps the tokens in use")
    }

    @Test("replica lag thresholds: records and times; bytes refused with a reason")
    func lag() throws {
        #expect(try LagThreshold.parse("1000").get() == LagThreshold(records: 1000))
        #expect(try LagThreshold.parse("500ms").get() == LagThreshold(nanoseconds: 500_000_000))
        #expect(try LagThreshold.parse("2s").get() == LagThreshold(nanoseconds: 2_000_000_000))
        guard case let .failure(e) = LagThreshold.parse("16MB") else { Issue.record("accepted 16MB"); return }
        #expect(e.message.contains("bytes"))
        guard case .failure = LagThreshold.parse("soon") else { Issue.record("accepted soon"); return }
        // Values whose conversion would overflow are refused, not trapped on.
        for huge in ["99999999999s", "400000000min", "1e300ms", "-5s", "nan s", "inf s"] {
            guard case .failure = LagThreshold.parse(huge) else { Issue.record("accepted \(huge)"); return }
        }
    }

    @Test("a hook runs with the site, role, term and reason in its environment; one that hangs is killed and logged, in order")
    func hooks() async throws {
        let dir = NSTemporaryDirectory() + "tandem-hooks-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let logs = LogLines()
        let out = dir + "/events"
        let hooks = RoleHooks(command: "echo \"$TANDEM_EVENT $TANDEM_SITE $TANDEM_ROLE $TANDEM_TERM $TANDEM_REASON\" >> \(out); [ \"$TANDEM_EVENT\" != lost_majority ] || sleep 10",
                              timeoutMilliseconds: 300, site: "sbg", log: { logs.add($0) })
        defer { hooks.stop() }
        let start = Date()
        hooks.roleChanged(.becamePrimary(term: Term(4)))
        hooks.roleChanged(.lostMajority(term: Term(4)))
        hooks.roleChanged(.steppedDown(term: Term(5), reason: "a higher term"))
        hooks.roleChanged(.switchoverStarted(to: "gra"))  // not a hook event
        #expect(Date().timeIntervalSince(start) < 0.2, "queuing a hook never blocks the caller")
        for _ in 0..<100 where !logs.contains("hook_event=stepped_down") { try await Task.sleep(for: .milliseconds(50)) }
        let lines = try String(contentsOfFile: out, encoding: .utf8).split(separator: "\n").map(String.init)
        #expect(lines == ["became_primary sbg primary 4 elected", "lost_majority sbg primary 4 no majority heard within the lease",
                          "stepped_down sbg replica 5 a higher term"])
        #expect(logs.contains("event=hook_failed hook_event=lost_majority reason=\"killed after 300 ms\""))
        #expect(logs.contains("event=hook_ran hook_event=stepped_down"))
    }
}

/// Runs curl; returns (HTTP status or 0, stdout bytes, stderr text).
func curl(_ args: [String]) throws -> (Int, Data, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = ["curl", "-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"] + args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let data = out.fileHandleForReading.readDataToEndOfFile()
    let errText = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    guard let nl = data.lastIndex(of: UInt8(ascii: "\n")) else { return (0, data, errText) }
    let code = Int(String(decoding: data[(nl + 1)...], as: UTF8.self)) ?? 0
    return (code, data[..<nl], errText)
}

@Suite("HTTPS for the API", .serialized)
struct HTTPSTests {
    @Test("the API over HTTPS with the site's certificate (system OpenSSL): probes, a 1 MiB upload and download, an upload over the limit refused with 413, and no plaintext")
    func https() async throws {
        let a = try APICluster()
        defer { a.stopAll() }
        try await a.startAll()
        let primary = try await a.ready()
        let site = try #require(a.c.ids.first { $0 != primary })
        let port = try Transport.freeLoopbackPort()
        let pki = a.c.dir + "/pki"
        let files = TLSFiles(certificate: "\(pki)/\(site).pem", privateKey: "\(pki)/\(site).key", certificateAuthority: "\(pki)/ca.pem")
        let t = HTTPSTerminator(listen: PeerEndpoint(host: "127.0.0.1", port: port), backendPort: UInt16(a.http[site]!),
                                context: try .httpsServer(files: files))
        try t.start()
        defer { t.stop() }
        let base = "https://\(site):\(port)"
        let common = ["--cacert", "\(pki)/ca.pem", "--resolve", "\(site):\(port):127.0.0.1"]
        let (probe, body, err) = try curl(common + [base + "/health"])
        #expect(probe == 200, "\(err)")
        #expect(String(decoding: body, as: UTF8.self).contains("\"site\":\"\(site)\""))
        let (head, _, _) = try curl(common + ["-I", base + "/replica"])
        #expect(head == 200)

        var document = [UInt8](repeating: 0, count: 1 << 20)
        var g = SeededRandom(seed: 11)
        for i in document.indices { document[i] = UInt8(truncatingIfNeeded: g.next()) }
        let file = a.c.dir + "/upload.bin"
        try Data(document).write(to: URL(fileURLWithPath: file))
        let (up, upBody, upErr) = try curl(common + ["-X", "POST", "-H", "Authorization: Bearer \(APICluster.writer)", "-H", "Tandem-Patient: PAT-1",
                                                     "-H", "Content-Type: application/octet-stream", "--data-binary", "@" + file, base + "/v1/documents"])
        #expect(up == 201, "\(upErr) \(String(decoding: upBody, as: UTF8.self))")
        let id = try #require((try JSONSerialization.jsonObject(with: upBody) as? [String: Any])?["id"] as? Int)
        let (down, downBody, _) = try curl(common + ["-H", "Authorization: Bearer \(APICluster.reader)", base + "/v1/documents/\(id)"])
        #expect(down == 200)
        #expect([UInt8](downBody) == document)

        // An upload over the limit (4 MiB here) is refused with 413 before it is read,
        // and the client gets that answer rather than a reset connection.
        let big = a.c.dir + "/too-big.bin"
        try Data(count: 6 << 20).write(to: URL(fileURLWithPath: big))
        for _ in 0..<3 {
            let (refused, refusedBody, refusedErr) = try curl(common + ["-X", "POST", "-H", "Expect:", "-H", "Authorization: Bearer \(APICluster.writer)",
                                                                         "-H", "Tandem-Patient: PAT-1", "-H", "Content-Type: application/octet-stream",
                                                                         "--data-binary", "@" + big, base + "/v1/documents"])
            #expect(refused == 413, "\(refusedErr) \(String(decoding: refusedBody, as: UTF8.self))")
        }

        // tandemctl's client (system OpenSSL): the certificate must chain to the CA and name the site.
        let (status, answer) = try HTTPSClient.request(host: "127.0.0.1", port: port, serverName: site.name,
                                                       certificateAuthority: "\(pki)/ca.pem", method: "GET", path: "/v1/admin/state-hash",
                                                       headers: [("Authorization", "Bearer \(APICluster.reader)")])
        #expect(status == 200)
        #expect(String(decoding: answer, as: UTF8.self).contains("state_hash"))
        let other = try #require(a.c.ids.first { $0 != site })
        #expect(throws: TransportError.self, "a certificate that does not name the site asked for is refused") {
            _ = try HTTPSClient.request(host: "127.0.0.1", port: port, serverName: other.name, certificateAuthority: "\(pki)/ca.pem",
                                        method: "GET", path: "/health")
        }

        // Plain HTTP on the HTTPS port gets nothing; a client that does not trust the CA refuses the server.
        let (plain, _, _) = try curl(["http://127.0.0.1:\(port)/health"])
        #expect(plain != 200)
        let (untrusted, _, untrustedErr) = try curl(["--resolve", "\(site):\(port):127.0.0.1", base + "/health"])
        #expect(untrusted == 0, "\(untrustedErr)")
    }
}
