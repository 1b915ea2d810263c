import Foundation
import Glibc
import TandemConfig

/// What a drill needs of a cluster: its sites' addresses, a token, and a way to kill and
/// restart a site's process.
public protocol ClusterControl: AnyObject, Sendable {
    var siteNames: [String] { get }
    var token: String { get }
    func url(_ site: String) -> String
    /// SIGKILL, and wait until the process is gone.
    func killSite(_ site: String) throws
    func startSite(_ site: String) throws
}

extension LocalCluster: ClusterControl {
    public var siteNames: [String] { options.sites }
    public func killSite(_ site: String) throws { signal(site, SIGKILL) }
    public func startSite(_ site: String) throws { try start(site) }
}

/// The cluster Deploy/local-cluster.sh started: configurations, pid files and the token in
/// its directory ($TANDEM_LOCAL).
public final class ScriptedLocalCluster: ClusterControl, @unchecked Sendable {
    public let root: String
    public let siteNames: [String]
    public let token: String
    private let urls: [String: String]
    private let script: String

    public init(root: String, script: String) throws {
        self.root = root
        self.script = script
        guard let t = FileManager.default.contents(atPath: root + "/token").map({ String(decoding: $0, as: UTF8.self) }) else {
            throw DrillError("no API token in \(root)/token: start the cluster with Deploy/local-cluster.sh first")
        }
        token = t.trimmingCharacters(in: .whitespacesAndNewlines)
        let c: SiteConfiguration
        do { c = try SiteConfiguration.load(path: root + "/sbg.toml") } catch { throw DrillError("\(error)") }
        siteNames = c.sites.map(\.id.name)
        urls = Dictionary(uniqueKeysWithValues: c.sites.map { ($0.id.name, "http://" + $0.httpAddress) })
    }

    public func url(_ site: String) -> String { urls[site] ?? "" }

    public func killSite(_ site: String) throws {
        let path = root + "/\(site).pid"
        guard let text = FileManager.default.contents(atPath: path).map({ String(decoding: $0, as: UTF8.self) }),
              let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) else { throw DrillError("no pid file \(path)") }
        // A stale pid file must not kill an unrelated process.
        let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline").map { String(decoding: $0, as: UTF8.self) } ?? ""
        guard cmdline.contains("tandemd") else { throw DrillError("pid \(pid) in \(path) is not a tandemd process") }
        kill(pid, SIGKILL)
        var waited = 0
        while kill(pid, 0) == 0 && waited < 1_000 {
            usleep(10_000)
            waited += 1
        }
        try? FileManager.default.removeItem(atPath: path)
    }

    /// Starts the site's tandemd as Deploy/local-cluster.sh does (its own session, output
    /// appended to its log, a pid file), spawned directly: a daemon started through a
    /// shell script would keep descriptors that make Foundation's Process wait forever.
    public func startSite(_ site: String) throws {
        let tandemd = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path + "/tandemd"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, root + "/\(site).log", O_WRONLY | O_APPEND | O_CREAT, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, Int16(0x80))  // POSIX_SPAWN_SETSID: outlives the drill
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup(tandemd), strdup("--config"), strdup(root + "/\(site).toml"), nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, tandemd, &actions, &attributes, argv, environ)
        guard rc == 0 else { throw DrillError("cannot start \(tandemd): \(String(cString: strerror(rc)))") }
        try "\(pid)\n".write(toFile: root + "/\(site).pid", atomically: true, encoding: .utf8)
        // Reaped by whoever waits for it: this process does not (it ends first, and init
        // adopts the daemon), so do not leave a zombie while the drill runs.
        let child = pid
        Thread.detachNewThread { var status: Int32 = 0; _ = waitpid(child, &status, 0) }
    }
}

/// One round of the fire: the primary killed under load.
public struct FireRound: Sendable {
    public var killed: String
    public var newPrimary: String?
    /// From the kill until another site answered 200 on /primary.
    public var newPrimaryAfter: Double?
    /// From the kill to the first write acknowledged after it.
    public var writesResumedAfter: Double?
    /// The longest stretch without an acknowledged write, around the kill.
    public var longestPause: Double
}

/// What a fire drill saw.
public struct FireReport: Sendable {
    public var rounds: [FireRound] = []
    public var acknowledged = 0
    public var failedVisibly = 0
    public var unknownOutcome = 0
    public var linearizableReads = 0
    public var missing: [String: [String]] = [:]
    public var appliedDespiteFailure: [String] = []
    public var failureReasons: [String: String] = [:]
    public var linearizabilityViolations: [String] = []
    public var converged = false
    public var hashes: [String: String] = [:]

    public var passed: Bool { missing.isEmpty && appliedDespiteFailure.isEmpty && linearizabilityViolations.isEmpty && converged }

    /// The visible refusals counted by status and error code ("503 no_primary": 3), so a
    /// drill that saw more than it should says which answer it was.
    public var failuresByReason: [String: Int] {
        var counts: [String: Int] = [:]
        for reason in failureReasons.values { counts[reason, default: 0] += 1 }
        return counts
    }

    /// One machine-readable line (JSON), to track drills over time.
    public var json: String {
        let pauses = rounds.map(\.longestPause).sorted()
        let o: [String: Any] = [
            "drill": "kill_primary", "rounds": rounds.count,
            "new_primary_after_s": rounds.map { $0.newPrimaryAfter ?? -1 },
            "writes_resumed_after_s": rounds.map { $0.writesResumedAfter ?? -1 },
            "write_pause_max_s": pauses.last ?? 0,
            "write_pause_p99_s": pauses.isEmpty ? 0 : pauses[min(pauses.count - 1, Int(Double(pauses.count) * 0.99))],
            "acknowledged": acknowledged, "failed_visibly": failedVisibly, "failed_by_reason": failuresByReason,
            "outcome_unknown": unknownOutcome,
            "lost_acknowledged": missing.values.map(\.count).max() ?? 0, "applied_despite_failure": appliedDespiteFailure.count,
            "linearizability_violations": linearizabilityViolations.count, "converged": converged, "passed": passed,
        ]
        return (try? JSONSerialization.data(withJSONObject: o, options: [.sortedKeys])).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
    }

    public var text: String {
        var out: [String] = []
        for (i, r) in rounds.enumerated() {
            let resumed = r.writesResumedAfter.map { String(format: "%.2f s", $0) } ?? "never"
            let elected = r.newPrimaryAfter.map { String(format: "%.2f s", $0) } ?? "-"
            out.append("round \(i + 1): killed the primary \(r.killed) with SIGKILL; new primary: \(r.newPrimary ?? "none") after \(elected); "
                + "writes resumed after \(resumed); longest pause \(String(format: "%.2f s", r.longestPause))")
        }
        out.append("bookings acknowledged: \(acknowledged); refused visibly: \(failedVisibly); outcome unknown to the client "
            + "(connection cut by the kill): \(unknownOutcome); linearizable reads: \(linearizableReads)")
        out.append(missing.isEmpty ? "lost acknowledged bookings: none (checked on every site)"
            : "LOST acknowledged bookings: " + missing.map { "\($0.key): \($0.value.count)" }.joined(separator: ", "))
        if !appliedDespiteFailure.isEmpty {
            out.append("APPLIED although the client was told they failed: \(appliedDespiteFailure.count): "
                + appliedDespiteFailure.prefix(3).map { "\($0) (\(failureReasons[$0] ?? "?"))" }.joined(separator: ", "))
        }
        out.append(linearizabilityViolations.isEmpty ? "linearizable reads: all consistent"
            : "LINEARIZABILITY VIOLATIONS: \(linearizabilityViolations.count), first: \(linearizabilityViolations[0])")
        out.append(converged ? "every site holds the same state (hash \(hashes.values.first?.split(separator: ":").last.map { String($0.prefix(16)) } ?? "?")...)"
            : "sites DIFFER: \(hashes)")
        return out.joined(separator: "\n")
    }
}

public enum FireDrill {
    /// Runs a workload, kills the primary `rounds` times (restarting it after each round),
    /// then checks that nothing acknowledged was lost and that the sites converged.
    /// `through`: where clients send their calls (default: every site in turn; a load
    /// balancer's address in the HAProxy drill).
    public static func run(_ cluster: any ClusterControl, rounds: Int = 3, secondsPerRound: Double = 6, writers: Int = 8,
                           through: [String: String]? = nil, readsThrough: [String: String]? = nil,
                           say: @Sendable (String) -> Void = { _ in }) async throws -> FireReport {
        guard await primary(cluster, seconds: 30) != nil else {
            let why = (cluster as? LocalCluster)?.exitedSites() ?? [:]
            throw DrillError("no primary came up" + (why.isEmpty ? "" : "; \(why)"))
        }
        let workload = Workload(urls: through ?? Dictionary(uniqueKeysWithValues: cluster.siteNames.map { ($0, cluster.url($0)) }),
                                token: cluster.token, writers: writers, readers: 2, readURLs: readsThrough)
        workload.start()
        do {
            return try await drill(cluster, workload, rounds: rounds, secondsPerRound: secondsPerRound, say: say)
        } catch {
            // Never leave clients looping against ports a later drill may reuse.
            await workload.stop()
            throw error
        }
    }

    static func drill(_ cluster: any ClusterControl, _ workload: Workload, rounds: Int, secondsPerRound: Double,
                       say: @Sendable (String) -> Void) async throws -> FireReport {
        var report = FireReport()
        try await Task.sleep(nanoseconds: UInt64(secondsPerRound / 3 * 1e9))
        for round in 1...max(1, rounds) {
            guard let victim = await primary(cluster, seconds: 20) else { throw DrillError("round \(round): no primary") }
            let killedAt = Date()
            try cluster.killSite(victim)
            say("round \(round): killed the primary, \(victim), with SIGKILL")
            let next = await primary(cluster, seconds: 20, excluding: victim)
            let electedAfter = next.map { _ in Date().timeIntervalSince(killedAt) }
            say("round \(round): new primary \(next ?? "none") after \(String(format: "%.2f", electedAfter ?? -1)) s")
            try await Task.sleep(nanoseconds: UInt64(secondsPerRound / 2 * 1e9))
            try cluster.startSite(victim)
            try await Task.sleep(nanoseconds: UInt64(secondsPerRound / 2 * 1e9))
            report.rounds.append(FireRound(killed: victim, newPrimary: next, newPrimaryAfter: electedAfter,
                                           writesResumedAfter: workload.firstAck(after: killedAt),
                                           longestPause: workload.longestPause(from: killedAt.addingTimeInterval(-1), to: Date())))
        }
        await workload.stop()
        report.acknowledged = workload.acknowledged.count
        report.failedVisibly = workload.failures.count
        report.unknownOutcome = workload.unknownOutcomes.count
        report.linearizableReads = workload.readCount
        let sites = cluster.siteNames
        let (missing, present) = try await DrillCheck.check(cluster, workload, sites: sites)
        report.missing = missing
        report.appliedDespiteFailure = workload.failures.keys.filter { present.contains($0) }.sorted()
        report.failureReasons = workload.failures
        report.linearizabilityViolations = workload.linearizabilityViolations()
        (report.converged, report.hashes) = try await DrillCheck.converged(cluster, sites: sites)
        return report
    }

    /// The site answering 200 on /primary, waiting up to `seconds`.
    public static func primary(_ cluster: any ClusterControl, seconds: Double, excluding: String? = nil) async -> String? {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            for s in cluster.siteNames where s != excluding {
                if (try? await HTTP.status("HEAD", cluster.url(s) + "/primary")) == 200 { return s }
            }
            try? await Task.sleep(nanoseconds: 20_000_000)
        }
        return nil
    }
}
