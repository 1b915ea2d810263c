import ArgumentParser
import Foundation
import Glibc
import TandemConfig
import TandemDrill
import TandemModel
import TandemStore

/// `tandem-bench cluster`: three real tandemd processes on loopback with TLS and the
/// default settings, measured through the HTTP API as a client sees them.
struct ClusterBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "Latency, throughput, failover, catch-up and memory of real tandemd processes on loopback.")
    @OptionGroup var common: CommonOptions
    @Option(help: "Seconds per throughput measurement.") var seconds = 5.0
    @Option(help: "Failover rounds.") var failovers = 20
    @Option(name: .customLong("catch-up-mib"), help: "MiB of log written while a site is down, for the catch-up figure.") var catchUpMiB = 1024
    @Option(help: "The Deploy directory (make-certs.sh).") var deploy = "Deploy"
    @Option(name: .customLong("snapshot-mib"), help: "Database sizes in MiB for the snapshot path (create, transfer, install), comma-separated.")
    var snapshotMiB = "100,1024"
    @Option(help: "Extra TOML for every site's [storage] table, to compare settings (e.g. \"direct_io = false\").") var storage: String = ""
    @Option(help: "Which figures to measure, comma-separated (latency, throughput, mix, reads, documents, catchup, failover, snapshot, five), or all. The floor is always measured.")
    var figures = "all"

    /// The figure groups `--figures` may name.
    static let figureNames: Set<String> = ["latency", "throughput", "mix", "reads", "documents", "catchup", "failover", "snapshot", "five"]

    func validate() throws {
        let unknown = Set(selected).subtracting(Self.figureNames)
        guard unknown.isEmpty else {
            throw ValidationError("unknown figure(s) \(unknown.sorted().joined(separator: ", ")); choose from \(Self.figureNames.sorted().joined(separator: ", ")) or all")
        }
    }

    private var selected: [String] {
        figures == "all" ? Array(Self.figureNames) : figures.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
    }

    func run() async throws {
        let bin = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path
        let quick = common.quick
        let want = Set(selected)
        /// The cases of a figure, or none when `--figures` leaves it out.
        func pick<T>(_ figure: String, _ cases: [T]) -> [T] { want.contains(figure) ? cases : [] }
        let secs = quick ? 0.5 : seconds
        let dir = try common.scratch("cluster")
        defer { try? FileManager.default.removeItem(atPath: dir) }

        // The floor no synchronous replication can beat: one loopback round trip and one fdatasync.
        let rtt = try loopbackRoundTrip(samples: quick ? 200 : 2000)
        let fsyncMicroseconds = try measureFsync(dir: dir, samples: quick ? 50 : 500)
        let fsync = (p50: fsyncMicroseconds.p50 / 1e6, p99: fsyncMicroseconds.p99 / 1e6)
        let floor = rtt.p50 + fsync.p50
        emit(["bench": "cluster", "figure": "floor", "loopback_rtt_p50_ms": round3(rtt.p50 * 1e3),
              "fdatasync_p50_ms": round3(fsync.p50 * 1e3), "floor_p50_ms": round3(floor * 1e3)])
        note(String(format: "floor: loopback round trip %.3f ms + fdatasync %.3f ms = %.3f ms", rtt.p50 * 1e3, fsync.p50 * 1e3, floor * 1e3))

        var options = LocalCluster.Options()
        // tandemd's defaults (the figures are for them).
        options.leaseMilliseconds = TimingDefaults.leaseMilliseconds
        options.heartbeatMilliseconds = TimingDefaults.heartbeatMilliseconds
        options.jitterMilliseconds = TimingDefaults.electionJitterMilliseconds
        options.transferTimeoutMilliseconds = 4000
        options.storage = storage
        let c = try LocalCluster(options: options, binDirectory: bin, deployDirectory: deploy, dir: dir + "/three")
        defer { c.stopAll() }
        try c.startAll()
        guard let primary = await c.waitForPrimary(seconds: 30) else { throw DrillError("no primary came up") }
        let replica = c.options.sites.first { $0 != primary } ?? primary
        _ = try await HTTP.call("POST", c.url(primary) + "/v1/execute", token: c.token,
                                json: ["statements": [["sql": "CREATE TABLE bench (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"]]])
        let value = String(repeating: "x", count: 256)
        let counter = Counter()
        // Every write a client was told succeeded, checked on every site after the failovers.
        let acked = AcknowledgedIDs()
        let url = Dictionary(uniqueKeysWithValues: c.options.sites.map { ($0, c.url($0)) })
        let token = c.token
        // The body's bytes around the id, made once: the load generator must not be the
        // limit (etcd's side posts a body made once, too).
        let bodyHead = Array(#"{"statements":[{"sql":"INSERT INTO bench (id, v) VALUES (?, ?)","params":["#.utf8)
        let bodyTail = Array(#","\#(value)"]}]}"#.utf8)
        @Sendable func write256(_ client: KeepAliveClient, _ site: String) -> Bool {
            let id = counter.next()
            let a = try? client.call("POST", (url[site] ?? "") + "/v1/execute", token: token, body: bodyHead + Array(String(id).utf8) + bodyTail,
                                     headers: [("Content-Type", "application/json")])
            guard a?.status == 200 else { return false }
            acked.add(id)
            return true
        }
        // Memory at rest.
        let idle = c.options.sites.map { ($0, rssMiB(c.pid($0))) }
        emit(["bench": "cluster", "figure": "memory_idle", "rss_mib": Dictionary(uniqueKeysWithValues: idle.map { ($0.0, $0.1) })])

        // Commit latency, one client, on the primary and through a replica (forwarded).
        for (name, site) in pick("latency", [("primary", primary), ("replica", replica)]) {
            let lat = await latencies(quick ? 50 : 1000) { client, _ in write256(client, site) }
            let p50 = percentile(lat, 0.5), p99 = percentile(lat, 0.99)
            emit(["bench": "cluster", "figure": "commit_latency", "through": name, "clients": 1, "value_bytes": 256,
                  "p50_ms": round3(p50 * 1e3), "p99_ms": round3(p99 * 1e3), "ratio_to_floor_p50": round3(p50 / floor), "target_ratio": 1.5])
            note(String(format: "commit latency via %@: p50 %.2f ms, p99 %.2f ms (%.2f× the floor; target ≤ 1.5)", name, p50 * 1e3, p99 * 1e3, p50 / floor))
        }

        // Throughput at 1, 16 and 64 clients, 256-byte writes, with the clients' CPU share
        // and the primary's fdatasyncs per write (group commit).
        var loadedRSS: [String: Double] = [:]
        // Local snapshots the sites logged so far, and their time: each copies the whole
        // database, a cost a long figure must show rather than hide in its average.
        func snapshotsLogged() -> (count: Int, milliseconds: Int) {
            var n = 0, ms = 0
            for s in c.options.sites {
                for f in logFields(c.logPath(s), event: "snapshot") {
                    n += 1
                    ms += Int(f["took_ms"] ?? "") ?? 0
                }
            }
            return (n, ms)
        }
        for clients in pick("throughput", [1, 16, 64]) {
            let snapshotsBefore = snapshotsLogged()
            let fsyncsBefore = try await fsyncCount(c, primary)
            let sitesCPUBefore = c.options.sites.map { processCPUSeconds(pid: c.pid($0)) }
            let (n, failed, wall, cpu) = await driveThreads(clients: clients, seconds: secs) { _, client in write256(client, primary) } sample: {
                if clients == 64 { for s in c.options.sites { loadedRSS[s] = max(loadedRSS[s] ?? 0, rssMiB(c.pid(s))) } }
            }
            let fsyncs = try await fsyncCount(c, primary) - fsyncsBefore
            // What a write costs the three sites together, in CPU: the figure batching lowers.
            let siteCPU = zip(c.options.sites, sitesCPUBefore).map { processCPUSeconds(pid: c.pid($0.0)) - $0.1 }
            let cpuPerWrite = n > 0 ? siteCPU.reduce(0, +) / Double(n) : 0
            let perSite = Dictionary(uniqueKeysWithValues: zip(c.options.sites, siteCPU).map { ($0.0 == primary ? "primary:" + $0.0 : $0.0, round3(n > 0 ? $0.1 / Double(n) * 1e3 : 0)) })
            let perFsync = fsyncs > 0 ? Double(n) / Double(fsyncs) : 0
            let snapshotsAfter = snapshotsLogged()
            let snapshots = snapshotsAfter.count - snapshotsBefore.count
            let snapshotMs = snapshotsAfter.milliseconds - snapshotsBefore.milliseconds
            emit(["bench": "cluster", "figure": "throughput", "workload": "write_256b", "clients": clients, "writes_per_second": Int(Double(n) / wall),
                  "failed_operations": failed, "client_cpu_share": round3(cpu), "writes_per_fdatasync": round3(perFsync),
                  "group_commit_efficiency": round3(min(1, perFsync / Double(clients))),
                  "sites_cpu_ms_per_write": round3(cpuPerWrite * 1e3), "cpu_ms_per_write_by_site": perSite,
                  "local_snapshots": snapshots, "local_snapshot_ms": snapshotMs])
            let snapshotNote = snapshots > 0 ? String(format: "; %d local snapshots, %.1f s in all", snapshots, Double(snapshotMs) / 1000) : ""
            note(String(format: "throughput, %d clients: %.0f writes/s (clients used %.0f%% of a core; %.1f writes per fdatasync; the sites spent %.2f ms of CPU per write",
                        clients, Double(n) / wall, cpu * 100, perFsync, cpuPerWrite * 1e3) + snapshotNote + ")"
                 + (failed > 0 ? "; \(failed) writes failed, not counted" : ""))
        }
        emit(["bench": "cluster", "figure": "memory_under_64_clients", "rss_mib": loadedRSS])

        // The telehealth mix: bookings, cancellations, reports, small documents.
        let mixCounter = Counter()
        let sites = c.options.sites
        @Sendable func mixed(_ i: Int, _ client: KeepAliveClient) -> Bool {
            let k = mixCounter.next()
            let site = url[sites[k % sites.count]] ?? ""
            switch k % 10 {
            case 0..<6:
                // Slots never repeat (the 12-month formula used before gave a practitioner
                // the same slot again after 403,200 operations).
                let body: [String: Any] = ["practitioner": "BENCH-DR-\(k % 50)", "patient": "BENCH-P-\(k)",
                                           "starts_at": Workload.slotStart(year: 2031, slot: k, minutes: 30),
                                           "duration_minutes": 20]
                return (try? client.call("POST", site + "/v1/appointments", token: token, json: body))?.status == 201
            case 6:
                let a = try? client.call("POST", site + "/v1/appointments/\(max(1, k / 2))/cancel", token: token)
                return a.map { [200, 404, 409].contains($0.status) } ?? false
            case 7, 8:
                let report = String(repeating: "Consultation report. ", count: 100)
                return (try? client.call("POST", site + "/v1/execute", token: token, json: ["statements": [
                    ["sql": "INSERT OR IGNORE INTO patients (reference) VALUES (?)", "params": ["BENCH-R-\(k)"]],
                    ["sql": "INSERT INTO documents (patient_id, kind, content_type, size, sha256, bytes) SELECT id, 'report', 'text/plain', ?, ?, ? FROM patients WHERE reference = ?",
                     "params": [report.utf8.count, SHA.hex(Array(report.utf8)), ["base64": Data(report.utf8).base64EncodedString()], "BENCH-R-\(k)"]],
                ]]))?.status == 200
            default:
                var doc = [UInt8](repeating: 0, count: 16 << 10)
                for j in stride(from: 0, to: doc.count, by: 64) { doc[j] = UInt8(truncatingIfNeeded: k &+ j) }
                return (try? client.call("POST", site + "/v1/documents", token: token, body: doc,
                                         headers: [("Tandem-Patient", "BENCH-U-\(k)"), ("Content-Type", "application/pdf")]))?.status == 201
            }
        }
        for clients in pick("mix", [16, 64]) {
            let (n, failed, wall, cpu) = await driveThreads(clients: clients, seconds: secs) { i, client in mixed(i, client) }
            emit(["bench": "cluster", "figure": "throughput", "workload": "telehealth_mix", "clients": clients,
                  "operations_per_second": Int(Double(n) / wall), "failed_operations": failed, "client_cpu_share": round3(cpu)])
            note(String(format: "telehealth mix, %d clients: %.0f operations/s", clients, Double(n) / wall)
                 + (failed > 0 ? " (\(failed) failed, not counted)" : ""))
        }

        // Linearizable reads on the primary and through a replica (forwarded to the primary).
        for (name, site) in pick("reads", [("primary", primary), ("replica", replica)]) {
            let base = url[site] ?? ""
            // The body made from prepared bytes, as for writes: Foundation's JSON encoder
            // per request took most of the client's 48-65% of a core in this figure.
            let queryHead = Array(#"{"sql":"SELECT v FROM bench WHERE id = ?","params":["#.utf8), queryTail = Array("]}".utf8)
            @Sendable func read(_ client: KeepAliveClient, _ i: Int) -> Bool {
                (try? client.call("POST", base + "/v1/query", token: token, body: queryHead + Array(String(1 + i % 100).utf8) + queryTail,
                                  headers: [("Content-Type", "application/json")]))?.status == 200
            }
            let lat = await latencies(quick ? 50 : 1000, read)
            let (n, failed, wall, cpu) = await driveThreads(clients: 16, seconds: secs) { i, client in read(client, i) }
            emit(["bench": "cluster", "figure": "linearizable_read", "through": name, "p50_ms": round3(percentile(lat, 0.5) * 1e3),
                  "p99_ms": round3(percentile(lat, 0.99) * 1e3), "reads_per_second_16_clients": Int(Double(n) / wall), "failed_operations": failed, "client_cpu_share": round3(cpu)])
            note(String(format: "linearizable reads via %@: p50 %.2f ms, %.0f reads/s with 16 clients", name, percentile(lat, 0.5) * 1e3, Double(n) / wall))
        }

        // Documents of growing size.
        for size in pick("documents", [1 << 10, 1 << 20, 10 << 20]) {
            var doc = [UInt8](repeating: 0, count: size)
            var g = SeededRandom(seed: UInt64(size))
            for j in stride(from: 0, to: size, by: 8) { doc[j] = UInt8(truncatingIfNeeded: g.next()) }
            let document = doc, base = url[primary] ?? ""
            let lat = await latencies(quick ? 3 : (size > 1 << 20 ? 10 : 50)) { client, i in
                (try? client.call("POST", base + "/v1/documents", token: token, body: document,
                                  headers: [("Tandem-Patient", "BENCH-DOC-\(size)-\(i)"), ("Content-Type", "application/octet-stream")]))?.status == 201
            }
            emit(["bench": "cluster", "figure": "document_write_latency", "bytes": size, "p50_ms": round3(percentile(lat, 0.5) * 1e3),
                  "samples": lat.count])
            note(String(format: "document of %d bytes: write p50 %.1f ms", size, percentile(lat, 0.5) * 1e3))
        }

        // Catch-up: a site down while the others write, then back.
        if want.contains("catchup") {
            let lagging = c.options.sites.first { $0 != primary } ?? primary
            let mib = quick ? 16 : catchUpMiB
            let (took, caughtUp) = try await catchUp(c, primary: primary, lagging: lagging, mib: mib, seed: 99, label: "CATCHUP")
            emit(["bench": "cluster", "figure": "catch_up", "path": "log", "mib": mib, "seconds": round3(took),
                  "mb_per_second": round3(Double(mib) * 1.048576 / took), "caught_up": caughtUp])
            note(String(format: "catch-up of %d MiB of log: %.1f s (%.0f MB/s)", mib, took, Double(mib) * 1.048576 / took))
        }

        // Failover: kill -9 of the primary, until a write succeeds again.
        var times: [Double] = []
        for round in 0..<(want.contains("failover") ? (quick ? 2 : failovers) : 0) {
            guard let p = await c.waitForPrimary(seconds: 30) else { break }
            let survivors = c.options.sites.filter { $0 != p }
            let t = monotonicNanoseconds()
            c.signal(p, SIGKILL)
            _ = await onThread {
                let client = KeepAliveClient(timeoutSeconds: 5)
                var k = 0
                while Double(monotonicNanoseconds() - t) / 1e9 < 30 {
                    if write256(client, survivors[k % survivors.count]) { return true }
                    k += 1
                }
                return false
            }
            times.append(Double(monotonicNanoseconds() - t) / 1e9)
            try c.start(p)
            note(String(format: "failover %d: writes succeed again %.2f s after the kill", round + 1, times.last ?? 0))
            try await Task.sleep(nanoseconds: 1_500_000_000)
        }
        times.sort()
        // No acknowledged write lost: once the sites stand at one LSN with one state hash,
        // each holds every id it was told was written (those of the latency, throughput
        // and failover figures above).
        // Elections while nothing is killed (the check itself reads every row of every
        // site's database): there should be none.
        func highestTerm() async -> Int {
            var t = 0
            for site in c.options.sites { t = max(t, (await c.status(site))?["term"] as? Int ?? 0) }
            return t
        }
        let termBefore = await highestTerm()
        let (converged, standing) = try await DrillCheck.converged(c, sites: c.options.sites, seconds: 60)
        let electionsDuringCheck = max(0, await highestTerm() - termBefore)
        var lost = 0
        let ids = acked.all
        for site in c.options.sites {
            let have = try await benchIDs(c, site)
            lost += ids.filter { !have.contains($0) }.count
        }
        emit(["bench": "cluster", "figure": "failover", "rounds": times.count, "p50_s": round3(percentile(times, 0.5)),
              "p99_s": round3(percentile(times, 0.99)), "lease_ms": options.leaseMilliseconds,
              "acknowledged_writes": ids.count, "lost_acknowledged": lost, "converged": converged,
              "elections_during_convergence_check": electionsDuringCheck])
        note("failover: \(ids.count) acknowledged writes checked on every site after \(times.count) kills: \(lost) missing, sites \(converged ? "converged" : "did NOT converge"), \(electionsDuringCheck) elections while the check ran")
        if !converged {
            // Where each site stood (LSN:state hash), for the operator to tell a lagging
            // site from a diverged one.
            note("sites apart: " + standing.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
            for site in c.options.sites {
                let st = (try? await HTTP.json("GET", c.url(site) + "/status")) ?? [:]
                let data = (try? JSONSerialization.data(withJSONObject: st, options: [.sortedKeys])) ?? Data()
                note("status of \(site): \(String(decoding: data, as: UTF8.self))")
            }
            if ProcessInfo.processInfo.environment["TANDEM_BENCH_HOLD_ON_FAILURE"] == "1" {
                note("holding the cluster for inspection (TANDEM_BENCH_HOLD_ON_FAILURE): \(c.options.sites.map { c.url($0) })")
                try await Task.sleep(nanoseconds: 900_000_000_000)
            }
        }
        c.stopAll()
        guard lost == 0 && converged else { throw DrillError("acknowledged writes lost (\(lost)) or sites apart after the failovers") }

        // The snapshot path: a site down while the database grew by `mib` MiB, on a cluster
        // that keeps no log beyond its snapshots, so the site must take a snapshot (created
        // on the primary, sent in chunks over TLS, installed), then the log after it.
        let sizes = !want.contains("snapshot") ? [] : quick ? [8] : snapshotMiB.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        for mib in sizes {
            var small = options
            small.storage = "segment_bytes = 1048576\nsnapshot_every_records = 8\nsnapshot_log_fraction = 0\nretain_log_bytes = 0\nretain_log_hours = 0"
            try await snapshotPath(options: small, mib: mib, bin: bin, dir: dir + "/snapshot-\(mib)")
        }

        // How cost grows with the cluster: commit latency with five sites against three.
        guard want.contains("five") else { return }
        var five = options
        five.sites = ["s1", "s2", "s3", "s4", "s5"]
        let c5 = try LocalCluster(options: five, binDirectory: bin, deployDirectory: deploy, dir: dir + "/five")
        defer { c5.stopAll() }
        try c5.startAll()
        if let p5 = await c5.waitForPrimary(seconds: 30) {
            _ = try await HTTP.call("POST", c5.url(p5) + "/v1/execute", token: c5.token,
                                    json: ["statements": [["sql": "CREATE TABLE bench (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"]]])
            let base = c5.url(p5), token5 = c5.token
            let lat = await latencies(quick ? 50 : 1000) { client, i in
                (try? client.call("POST", base + "/v1/execute", token: token5,
                                  json: ["statements": [["sql": "INSERT INTO bench (id, v) VALUES (?, ?)", "params": [i, value]]]]))?.status == 200
            }
            emit(["bench": "cluster", "figure": "commit_latency", "through": "primary", "sites": 5, "clients": 1,
                  "p50_ms": round3(percentile(lat, 0.5) * 1e3), "p99_ms": round3(percentile(lat, 0.99) * 1e3)])
            note(String(format: "five sites: commit latency p50 %.2f ms", percentile(lat, 0.5) * 1e3))
        }
    }
}

/// A shared counter for load generators.
/// The ids of the writes acknowledged to the benchmark's clients.
final class AcknowledgedIDs: @unchecked Sendable {
    private let lock = NSLock()
    private var ids: [Int] = []
    func add(_ id: Int) { lock.withLock { ids.append(id) } }
    var all: [Int] { lock.withLock { ids } }
}

/// Every id in a site's bench table, read locally a page at a time (results are bounded).
func benchIDs(_ c: LocalCluster, _ site: String) async throws -> Set<Int> {
    var have: Set<Int> = []
    var after = -1
    while true {
        let a = try await HTTP.call("POST", c.url(site) + "/v1/query", token: c.token, json: [
            "sql": "SELECT id FROM bench WHERE id > ? ORDER BY id LIMIT 5000", "params": [after], "consistency": "local"])
        guard a.status == 200, let rows = a.json["rows"] as? [[Any]] else {
            throw DrillError("\(site) did not answer the check: \(a.status) \(String(decoding: a.body, as: UTF8.self))")
        }
        let page = rows.compactMap { $0.first as? Int }
        have.formUnion(page)
        guard page.count == 5000, let last = page.last else { return have }
        after = last
    }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func next() -> Int { lock.withLock { defer { n += 1 }; return n } }
    var value: Int { lock.withLock { n } }
}

func processCPUSeconds() -> Double {
    var u = rusage()
    getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &u)
    return Double(u.ru_utime.tv_sec) + Double(u.ru_utime.tv_usec) / 1e6 + Double(u.ru_stime.tv_sec) + Double(u.ru_stime.tv_usec) / 1e6
}

/// CPU time (user and system) a process has used so far, in seconds (from /proc), 0 when
/// it cannot be read.
func processCPUSeconds(pid: Int32?) -> Double {
    guard let pid, let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = text.lastIndex(of: ")") else { return 0 }
    // After "(comm)": state is field 3, utime and stime are fields 14 and 15.
    let fields = text[text.index(after: close)...].split(separator: " ")
    guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
    return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
}

/// Resident memory of a process, MiB (from /proc).
func rssMiB(_ pid: Int32?) -> Double {
    guard let pid, let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
          let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return 0 }
    let kb = Double(line.split(separator: " ").dropFirst().first.map(String.init) ?? "") ?? 0
    return (kb / 1024 * 10).rounded() / 10
}

/// The primary's count of fdatasyncs so far (its /metrics).
func fsyncCount(_ c: LocalCluster, _ site: String) async throws -> Int {
    let a = try await HTTP.call("GET", c.url(site) + "/metrics")
    let text = String(decoding: a.body, as: UTF8.self)
    guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("tandem_fsync_seconds_count") }) else { return 0 }
    return Int(Double(line.split(separator: " ").last ?? "") ?? 0)
}

/// Loopback TCP round trip of a small message.
func loopbackRoundTrip(samples: Int) throws -> (p50: Double, p99: Double) {
    var fds: [Int32] = [0, 0]
    // A real TCP connection on loopback (not a socketpair): what the sites use.
    let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(listener) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &addr) { a in a.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, len) == 0 && getsockname(listener, $0, &len) == 0 } }
    listen(listener, 1)
    fds[0] = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    _ = withUnsafePointer(to: &addr) { a in a.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fds[0], $0, len) } }
    fds[1] = accept(listener, nil, nil)
    defer { close(fds[0]); close(fds[1]) }
    var one: Int32 = 1
    for fd in fds { setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size)) }
    let server = fds[1]
    let echo = Thread {
        var b = [UInt8](repeating: 0, count: 64)
        while true {
            let n = read(server, &b, 64)
            if n <= 0 { return }
            _ = write(server, b, n)
        }
    }
    echo.start()
    var lat: [Double] = []
    var b = [UInt8](repeating: 1, count: 64)
    for _ in 0..<samples {
        let t = monotonicNanoseconds()
        _ = write(fds[0], b, 64)
        var got = 0
        while got < 64 {
            let n = b.withUnsafeMutableBytes { read(fds[0], $0.baseAddress! + got, 64 - got) }
            if n <= 0 { break }
            got += n
        }
        lat.append(Double(monotonicNanoseconds() - t) / 1e9)
    }
    shutdown(fds[0], Int32(SHUT_RDWR))
    lat.sort()
    return (percentile(lat, 0.5), percentile(lat, 0.99))
}

/// SHA-256 hex, for benchmark documents.
enum SHA {
    static func hex(_ bytes: [UInt8]) -> String { SHA256Hasher.hex(SHA256Hasher.digest(bytes)) }
}

/// `tandem-bench http`: the same client and measurement as `cluster`, against any HTTP
/// endpoint (etcd's JSON gateway in Deploy/bench/compare.sh), so both sides of a
/// comparison are driven alike.
struct HTTPLoadBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "http",
        abstract: "Latency (1 client) and throughput (1, 16, 64 clients) of POSTs of a JSON body to a URL.")
    @Option(help: "The URL to POST to.") var url: String
    @Option(help: "The JSON body.") var body: String
    @Option(help: "A label for the results (system name).") var system = "peer"
    @Option(help: "Seconds per throughput measurement.") var seconds = 5.0
    @Option(help: "Latency samples with one client.") var samples = 1000

    func run() async throws {
        guard let json = try? JSONSerialization.jsonObject(with: Data(body.utf8)) else { throw ValidationError("--body must be JSON") }
        let payload = [UInt8](try JSONSerialization.data(withJSONObject: json))
        let target = url
        @Sendable func post(_ client: KeepAliveClient) -> Bool {
            let a = try? client.call("POST", target, body: payload, headers: [("Content-Type", "application/json")])
            return a.map { (200..<300).contains($0.status) } ?? false
        }
        let n = samples
        let lat = await latencies(n, timeoutSeconds: 10) { client, _ in post(client) }
        emit(["bench": "peer", "system": system, "figure": "commit_latency", "clients": 1, "p50_ms": round3(percentile(lat, 0.5) * 1e3),
              "p99_ms": round3(percentile(lat, 0.99) * 1e3), "samples": lat.count])
        for clients in [1, 16, 64] {
            let (n, failed, wall, cpu) = await driveThreads(clients: clients, seconds: seconds) { _, client in post(client) }
            emit(["bench": "peer", "system": system, "figure": "throughput", "workload": "write_256b", "clients": clients,
                  "writes_per_second": Int(Double(n) / wall), "failed_operations": failed, "client_cpu_share": round3(cpu)])
        }
    }
}

extension ClusterBench {
    /// Kills `lagging`, writes `mib` documents of 1 MiB on the primary (8 clients), starts
    /// `lagging` again and waits until it has applied the primary's commit LSN. Returns the
    /// seconds from its start to then, and whether it got there within `limitSeconds`.
    func catchUp(_ c: LocalCluster, primary: String, lagging: String, mib: Int, seed: UInt64, label: String,
                 limitSeconds: Double = 600) async throws -> (Double, Bool) {
        c.signal(lagging, SIGKILL)
        var bytes = [UInt8](repeating: 0, count: 1 << 20)
        var g = SeededRandom(seed: seed)
        for j in stride(from: 0, to: bytes.count, by: 8) { bytes[j] = UInt8(truncatingIfNeeded: g.next()) }
        let doc = bytes, base = c.url(primary), token = c.token
        let uploads = Counter()
        _ = await driveThreads(clients: 8, seconds: 3600) { _, client in
            let k = uploads.next()
            if k >= mib { return false }
            return (try? client.call("POST", base + "/v1/documents", token: token, body: doc,
                                     headers: [("Tandem-Patient", "BENCH-\(label)-\(k)")]))?.status == 201
        } stopWhen: { uploads.value >= mib }
        let commit = (await c.status(primary))?["commit_lsn"] as? Int ?? 0
        let t = monotonicNanoseconds()
        try c.start(lagging)
        var caughtUp = false
        while !caughtUp && Double(monotonicNanoseconds() - t) / 1e9 < limitSeconds {
            let s = await c.status(lagging)
            caughtUp = (s?["applied_lsn"] as? Int ?? 0) >= commit
            if !caughtUp { try await Task.sleep(nanoseconds: 50_000_000) }
        }
        return (Double(monotonicNanoseconds() - t) / 1e9, caughtUp)
    }

    /// Measures catch-up through a snapshot of a database of `mib` MiB: total time, and
    /// from the sites' log lines the snapshot's creation on the primary, its transfer and
    /// its installation on the site that was down.
    func snapshotPath(options: LocalCluster.Options, mib: Int, bin: String, dir: String) async throws {
        let c = try LocalCluster(options: options, binDirectory: bin, deployDirectory: deploy, dir: dir)
        defer {
            c.stopAll()
            try? FileManager.default.removeItem(atPath: dir)
        }
        try c.startAll()
        guard let primary = await c.waitForPrimary(seconds: 30) else { throw DrillError("no primary came up") }
        let lagging = c.options.sites.first { $0 != primary } ?? primary
        let (took, caughtUp) = try await catchUp(c, primary: primary, lagging: lagging, mib: mib, seed: UInt64(mib), label: "SNAP",
                                                 limitSeconds: 900)
        // The phases, from the log lines of the installation and of the snapshot it used.
        let installed = logFields(c.logPath(lagging), event: "snapshot_installed").last ?? [:]
        let lsn = installed["lsn"] ?? ""
        let created = logFields(c.logPath(primary), event: "snapshot").last { $0["lsn"] == lsn } ?? [:]
        func number(_ d: [String: String], _ k: String) -> Int { Int(d[k] ?? "") ?? -1 }
        emit(["bench": "cluster", "figure": "catch_up", "path": "snapshot", "mib": mib, "seconds": round3(took),
              "mb_per_second": round3(Double(mib) * 1.048576 / took), "caught_up": caughtUp,
              "took_snapshot": !installed.isEmpty])
        emit(["bench": "cluster", "figure": "snapshot", "database_mib": mib, "database_bytes": number(created, "database_bytes"),
              "file_bytes": number(installed, "bytes"), "create_ms": number(created, "took_ms"),
              "transfer_ms": number(installed, "transfer_ms"), "install_ms": number(installed, "install_ms")])
        note(String(format: "snapshot path, %d MiB: caught up in %.1f s (%.0f MB/s); snapshot create %d ms, transfer %d ms, install %d ms",
                    mib, took, Double(mib) * 1.048576 / took, number(created, "took_ms"), number(installed, "transfer_ms"),
                    number(installed, "install_ms")))
    }
}

/// The key=value fields of every line of a site's log with `event=<event>`.
func logFields(_ path: String, event: String) -> [[String: String]] {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [] }
    var out: [[String: String]] = []
    for line in text.split(separator: "\n") where line.contains(" event=\(event) ") {
        var fields: [String: String] = [:]
        for part in line.split(separator: " ") {
            guard let eq = part.firstIndex(of: "=") else { continue }
            fields[String(part[..<eq])] = String(part[part.index(after: eq)...])
        }
        if fields["event"] == event { out.append(fields) }
    }
    return out
}
