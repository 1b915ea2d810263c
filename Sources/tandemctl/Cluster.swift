import ArgumentParser
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import TandemConfig
import TandemHTTP
import TandemModel
import TandemNode
import TandemStore
import TandemTransport

/// Which sites a command talks to, over their HTTP API.
struct ClusterOptions: ParsableArguments {
    @Option(help: "A site's configuration file: the command talks to the sites it lists (their http_address).")
    var config: String?
    @Option(name: .customLong("site"), help: "A site's HTTP address (http://host:port); repeat for several. Instead of --config.")
    var sites: [String] = []
    @Option(help: "The API token (or set TANDEM_TOKEN).")
    var token: String?

    /// Every site to ask: its name, base URL, and (HTTPS) the CA its certificate must
    /// chain to and the name it must carry.
    func targets() throws -> [Target] {
        if !sites.isEmpty {
            return sites.map { Target(name: $0, url: $0.hasPrefix("http") ? $0 : "http://" + $0, ca: nil) }
        }
        guard let config else { throw ValidationError("give --config FILE or --site http://host:port") }
        let c: SiteConfiguration
        do { c = try SiteConfiguration.load(path: config) } catch { throw ValidationError("\(error)") }
        // This site first: single-site commands use it.
        let ordered = c.sites.filter { $0.id == c.siteID } + c.sites.filter { $0.id != c.siteID }
        return ordered.map { Target(name: $0.id.name, url: (c.apiTLS ? "https://" : "http://") + $0.httpAddress, ca: c.apiTLS ? c.tlsCA : nil) }
    }

    var bearer: String? { token ?? ProcessInfo.processInfo.environment["TANDEM_TOKEN"] }
}

/// A site to ask.
struct Target {
    var name: String
    var url: String
    /// For HTTPS: the cluster CA (from the configuration's tls.ca).
    var ca: String?
}

/// A failure to reach a site: says which address was tried.
struct Unreachable: Error, CustomStringConvertible {
    let url: String
    let reason: String
    var description: String { "cannot reach \(url): \(reason)" }
}

/// One HTTP call to `target` (`path` includes the query). HTTPS sites are reached with the
/// system's OpenSSL, checking their certificate against the cluster CA.
func call(_ method: String, _ target: Target, _ path: String, token: String?, json: Any? = nil, timeout: Double = 15) async throws -> (Int, Data) {
    let url = target.url + path
    var headers: [(String, String)] = []
    if let token { headers.append(("Authorization", "Bearer \(token)")) }
    let body = try json.map { try JSONSerialization.data(withJSONObject: $0) }
    if body != nil { headers.append(("Content-Type", "application/json")) }
    if let ca = target.ca {
        guard let u = URLComponents(string: target.url), let host = u.host, let port = u.port else {
            throw Unreachable(url: url, reason: "not a valid URL")
        }
        let ns = UInt64(timeout * 1e9)
        do throws(TransportError) {
            let (status, answer) = try HTTPSClient.request(host: host, port: UInt16(port), serverName: target.name, certificateAuthority: ca,
                                                           method: method, path: path, headers: headers, body: body.map { [UInt8]($0) } ?? [],
                                                           timeoutNanoseconds: ns)
            return (status, Data(answer))
        } catch {
            throw Unreachable(url: url, reason: "\(error)")
        }
    }
    guard let u = URL(string: url) else { throw Unreachable(url: url, reason: "not a valid URL") }
    var request = URLRequest(url: u)
    request.httpMethod = method
    request.timeoutInterval = timeout
    for (k, v) in headers { request.setValue(v, forHTTPHeaderField: k) }
    request.httpBody = body
    do {
        let (data, response) = try await URLSession.shared.data(for: request)
        return ((response as? HTTPURLResponse)?.statusCode ?? 0, data)
    } catch {
        throw Unreachable(url: url, reason: error.localizedDescription)
    }
}

func object(_ data: Data) -> [String: Any] { ((try? JSONSerialization.jsonObject(with: data)) as? [String: Any]) ?? [:] }

func apiError(_ status: Int, _ data: Data, _ url: String) -> ValidationError {
    let e = object(data)["error"] as? [String: Any]
    return ValidationError("\(url) answered \(status): \(e?["code"] as? String ?? "?"): \(e?["message"] as? String ?? String(decoding: data, as: UTF8.self))")
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Every site's role, term, lease, LSNs, lag and failure domain, and where the data lives.")
    @OptionGroup var cluster: ClusterOptions
    @Flag(help: "Print JSON.") var json = false

    func run() async throws {
        var rows: [[String: Any]] = []
        var placement: [String: Any]?
        var views: [String: [String: [String: Any]]] = [:]
        for t in try cluster.targets() {
            do {
                let (code, data) = try await call("GET", t, "/status", token: nil, timeout: 3)
                guard code == 200 else { throw Unreachable(url: t.url, reason: "status \(code)") }
                let doc = object(data)
                var site = doc["site"] as? [String: Any] ?? [:]
                site["address"] = t.url
                rows.append(site)
                if site["role"] as? String == "primary" {
                    placement = doc["placement"] as? [String: Any]
                    for s in doc["sites"] as? [[String: Any]] ?? [] { if let id = s["id"] as? String { views[id, default: [:]]["primary"] = s } }
                }
                if placement == nil { placement = doc["placement"] as? [String: Any] }
            } catch {
                rows.append(["id": t.name, "address": t.url, "unreachable": "\(error)"])
            }
        }
        if json {
            let out: [String: Any] = ["sites": rows, "placement": placement ?? NSNull()]
            let data = try JSONSerialization.data(withJSONObject: out, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        func cell(_ v: Any?) -> String {
            switch v {
            case nil, is NSNull: "-"
            case let d as Double: d == d.rounded() ? String(Int(d)) : String(format: "%.1f", d)
            case let b as Bool: b ? "yes" : "no"
            case let x?: "\(x)"
            }
        }
        let header = ["SITE", "DOMAIN", "ROLE", "TERM", "LEASE_MS", "COMMIT", "APPLIED", "LAG", "LAG_MS", "CONTACT_MS", "STATE"]
        var table = [header]
        for r in rows {
            guard r["unreachable"] == nil else {
                table.append([cell(r["id"]), "-", "unreachable", "-", "-", "-", "-", "-", "-", "-", "\(r["address"] ?? "")"])
                continue
            }
            let id = cell(r["id"])
            let seen = views[id]?["primary"]
            let state = (r["failed"] as? Bool == true) ? "FAILED" : (r["degraded"] as? Bool == true) ? "degraded" : "ok"
            table.append([id, cell(r["failure_domain"]), cell(r["role"]), cell(r["term"]), cell(r["lease_ms_left"]), cell(r["commit_lsn"]),
                          cell(r["applied_lsn"]), cell(r["lag_records"]), cell(r["lag_ms"]), cell(seen?["last_contact_ms_ago"]), state])
        }
        let widths = header.indices.map { i in table.map { $0[i].count }.max() ?? 0 }
        for row in table { print(row.enumerated().map { $1.padding(toLength: widths[$0] + 2, withPad: " ", startingAt: 0) }.joined()) }
        if let p = placement {
            print("")
            if let holders = p["sites_holding_commit_lsn"] as? [String] {
                print("writes through LSN \(cell(p["commit_lsn"])) are held by: \(holders.joined(separator: ", ")) (failure domains: \((p["failure_domains_holding_commit_lsn"] as? [String] ?? []).joined(separator: ", ")))")
            }
            if let votes = p["votes_by_failure_domain"] as? [String: Any] {
                print("votes by failure domain: " + votes.keys.sorted().map { "\($0)=\(cell(votes[$0]))" }.joined(separator: " "))
            }
            for w in p["warnings"] as? [String] ?? [] { print("WARNING: \(w)") }
        }
        if rows.allSatisfy({ $0["unreachable"] != nil }) { throw ExitCode(1) }
    }
}

struct Switchover: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Hand the primary's office to SITE (it must be a caught-up voter).")
    @OptionGroup var cluster: ClusterOptions
    @Option(help: "The site to become primary.") var to: String

    func run() async throws {
        var last: (any Error)?
        for t in try cluster.targets() {
            do {
                let (code, data) = try await call("POST", t, "/v1/admin/switchover", token: cluster.bearer, json: ["to": to], timeout: 30)
                guard code == 200 else { throw apiError(code, data, t.url) }
                let o = object(data)
                print("primary is now \(o["primary"] as? String ?? "?") (term \(o["term"] ?? "?"))" + ((o["milliseconds"] as? Double).map { String(format: ", took %.0f ms", $0) } ?? ""))
                return
            } catch let e as Unreachable {
                last = e  // try the next site
            }
        }
        throw ValidationError("\(last.map { "\($0)" } ?? "no site to ask")")
    }
}

struct CheckConfig: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "check-config", abstract: "Validate a site's configuration file and warn about placement.")
    @Argument(help: "The configuration file.") var file: String

    func run() async throws {
        do {
            let c = try SiteConfiguration.load(path: file)
            print("\(file): valid (site \(c.siteID), \(c.sites.count) sites, commit policy \(c.commitPolicy))")
            for w in c.cluster.placementWarnings { print("warning: \(w)") }
        } catch {
            FileHandle.standardError.write(Data("tandemctl: \(error)\n".utf8))
            throw ExitCode(2)
        }
    }
}

struct Export: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Export one day's appointments from a site's own copy (works on a degraded site).")
    @Argument(help: "What to export: appointments.") var what: String
    @OptionGroup var cluster: ClusterOptions
    @Option(help: "The day, like 2026-03-10.") var day: String
    @Option(help: "Only this practitioner's.") var practitioner: String?
    @Option(help: "csv or json.") var format = "csv"

    func run() async throws {
        guard what == "appointments" else { throw ValidationError("only appointments can be exported, not \"\(what)\"") }
        guard let t = try cluster.targets().first else { throw ValidationError("no site to ask") }
        var q = URLComponents()
        q.queryItems = [URLQueryItem(name: "day", value: day), URLQueryItem(name: "format", value: format)]
            + (practitioner.map { [URLQueryItem(name: "practitioner", value: $0)] } ?? [])
        let (code, data) = try await call("GET", t, "/v1/export/appointments?" + (q.percentEncodedQuery ?? ""), token: cluster.bearer)
        guard code == 200 else { throw apiError(code, data, t.url) }
        FileHandle.standardOutput.write(data)
        if format == "json" { print("") }
    }
}

struct Verify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Compare the state hash of every site at a common LSN, and name the site that differs.")
    @OptionGroup var cluster: ClusterOptions
    @Option(help: "How many times to ask while writes keep the sites at different LSNs.") var attempts = 50

    func run() async throws {
        let targets = try cluster.targets()
        for attempt in 1...max(1, attempts) {
            var hashes: [(String, Int, String)] = []
            for t in targets {
                let (code, data) = try await call("GET", t, "/v1/admin/state-hash", token: cluster.bearer)
                guard code == 200 else { throw apiError(code, data, t.url) }
                let o = object(data)
                hashes.append((o["site"] as? String ?? t.name, o["lsn"] as? Int ?? -1, o["state_hash"] as? String ?? ""))
            }
            guard Set(hashes.map(\.1)).count == 1 else {
                if attempt < attempts { try await Task.sleep(for: .milliseconds(200)) }
                continue
            }
            for (site, lsn, hash) in hashes { print("\(site)  lsn \(lsn)  \(hash)") }
            let counts = Dictionary(grouping: hashes, by: \.2)
            if counts.count == 1 {
                print("all \(hashes.count) sites agree at LSN \(hashes[0].1)")
                return
            }
            let majority = counts.max { $0.value.count < $1.value.count }?.key
            for (site, _, hash) in hashes where hash != majority { print("DIFFERS: \(site)") }
            throw ExitCode(1)
        }
        throw ValidationError("the sites never stood at the same LSN during \(attempts) attempts (writes in progress?); try again when quieter")
    }
}

struct Rebuild: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Wipe this (stopped) site's state and let it rebuild from its peers: a snapshot, then the log.",
        discussion: """
        For a site whose log refused to open for corruption, or whose disk was replaced. The old data directory is
        kept aside (renamed), its term and vote are carried over so the site cannot vote twice in a term, and an
        empty site is created. Start tandemd again: the primary sends it a snapshot and then the log. --follow shows
        the progress until it is back in step.
        """)
    @Option(help: "This site's configuration file.") var config: String
    @Flag(help: "Confirm: the site's data directory is moved aside.") var yes = false
    @Flag(help: "Then wait, showing progress, until the restarted site is back in step.") var follow = false

    func run() async throws {
        let c: SiteConfiguration
        do { c = try SiteConfiguration.load(path: config) } catch { throw ValidationError("\(error)") }
        guard let me = c.me else { throw ValidationError("site \(c.siteID) is not among the [[sites]] of \(config)") }
        let own = Target(name: me.id.name, url: (c.apiTLS ? "https://" : "http://") + me.httpAddress, ca: c.apiTLS ? c.tlsCA : nil)
        if (try? await call("GET", own, "/liveness", token: nil, timeout: 1)) != nil {
            throw ValidationError("tandemd answers on \(own.url): stop it before rebuilding this site")
        }
        guard yes else { throw ValidationError("this moves \(c.dataDirectory) aside; run again with --yes to go on") }
        let fm = FileManager.default
        if fm.fileExists(atPath: c.dataDirectory) {
            let aside = c.dataDirectory + ".before-rebuild-\(Int(Date().timeIntervalSince1970))"
            try fm.moveItem(atPath: c.dataDirectory, toPath: aside)
            print("moved \(c.dataDirectory) to \(aside)")
            let site = try SiteStorage.bootstrap(dataDirectory: c.dataDirectory, clusterID: c.clusterID)
            site.close()
            if let hard = fm.contents(atPath: aside + "/hardstate") {
                try Durable.writeFile([UInt8](hard), to: c.dataDirectory + "/hardstate")
            } else {
                // Its votes are lost: it abstains until it hears the primary.
                try SiteRuntime.markRejoining(dataDirectory: c.dataDirectory)
            }
        } else {
            try SiteRuntime.bootstrap(dataDirectory: c.dataDirectory, clusterID: c.clusterID, rejoining: true)
        }
        print("created an empty site in \(c.dataDirectory); start tandemd: it receives a snapshot, then the log")
        guard follow else { return }
        var lastLine = ""
        while true {
            if let (code, data) = try? await call("GET", own, "/status", token: nil, timeout: 2), code == 200,
               let s = object(data)["site"] as? [String: Any] {
                let applied = s["applied_lsn"] as? Int ?? 0
                let lag = s["lag_records"] as? Int ?? 0
                let total = max(1, applied + lag)
                let done = Double(applied) / Double(total)
                let bar = String(repeating: "#", count: Int(done * 40)) + String(repeating: ".", count: 40 - Int(done * 40))
                let line = "[\(bar)] \(applied)/\(total) records"
                if line != lastLine { print(line); lastLine = line }
                if applied > 0 && lag == 0 && s["degraded"] as? Bool == false {
                    print("back in step at LSN \(applied)")
                    return
                }
            }
            try await Task.sleep(for: .milliseconds(500))
        }
    }
}

struct Token: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create an API token: prints it once, and adds its SHA-256 (never the token) to the token file.")
    @Option(help: "A name for whoever uses it.") var name: String
    @Option(help: "read, write or admin.") var scope = "read"
    @Option(help: "The token file to add it to (api.token_file).") var file: String

    func run() async throws {
        guard let s = Scope(name: scope) else { throw ValidationError("--scope must be read, write or admin, got \"\(scope)\"") }
        guard !name.contains(where: { $0 == " " || $0 == "\t" || $0 == "\n" }) else { throw ValidationError("--name must be one word") }
        let token = TokenStore.generate()
        let line = TokenStore.line(name: name, scope: s, token: token) + "\n"
        let fd = open(file, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        guard fd >= 0 else { throw ValidationError("cannot open \(file): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let bytes = Array(line.utf8)
        guard write(fd, bytes, bytes.count) == bytes.count, fsync(fd) == 0 else {
            throw ValidationError("cannot write \(file): \(String(cString: strerror(errno)))")
        }
        print(token)
        FileHandle.standardError.write(Data("added \(name) (\(s)) to \(file); send SIGHUP to tandemd to load it\n".utf8))
    }
}
