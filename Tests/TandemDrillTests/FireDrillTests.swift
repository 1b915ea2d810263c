import Foundation
import Glibc
import Testing
@testable import TandemDrill

let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

/// The tandemd built with these tests (the test runner sits in the same build directory).
var binDirectory: String {
    let here = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path
    for dir in [here, repoRoot + "/.build/release", repoRoot + "/.build/debug"] where FileManager.default.isExecutableFile(atPath: dir + "/tandemd") {
        return dir
    }
    return here
}

func makeCluster(_ configure: (inout LocalCluster.Options) -> Void = { _ in }) throws -> LocalCluster {
    var o = LocalCluster.Options()
    configure(&o)
    return try LocalCluster(options: o, binDirectory: binDirectory, deployDirectory: repoRoot + "/Deploy")
}

/// Runs the checks every drill ends with, recording what failed.
func expectKept(_ c: LocalCluster, _ w: Workload, _ context: String) async throws {
    let (missing, present) = try await DrillCheck.check(c, w, sites: c.options.sites)
    #expect(missing.isEmpty, "\(context): acknowledged bookings missing: \(missing.mapValues(\.count))")
    let wrong = w.failures.keys.filter { present.contains($0) }
    #expect(wrong.isEmpty, "\(context): \(wrong.count) bookings applied although the client was told they failed: \(wrong.prefix(3)) \(w.failures.filter { wrong.contains($0.key) }.prefix(3))")
    let violations = w.linearizabilityViolations()
    #expect(violations.isEmpty, "\(context): \(violations.count) linearizability violations, first: \(violations.first ?? "")")
    let (converged, hashes) = try await DrillCheck.converged(c, sites: c.options.sites)
    #expect(converged, "\(context): sites differ: \(hashes)")
    #expect(w.acknowledged.count > 20, "\(context): the workload made progress (\(w.acknowledged.count) acknowledged)")
}

/// A workload through `sites` (all by default): clients that a load balancer sends only to
/// sites that pass their probes.
func workload(_ c: LocalCluster, writers: Int = 6, through sites: [String]? = nil) -> Workload {
    Workload(urls: Dictionary(uniqueKeysWithValues: (sites ?? c.options.sites).map { ($0, c.url($0)) }), token: c.token, writers: writers, readers: 2)
}

func sleep(_ seconds: Double) async throws { try await Task.sleep(nanoseconds: UInt64(seconds * 1e9)) }

@Suite("Fire drills with real tandemd processes", .serialized)
struct FireDrillTests {
    @Test("kill -9 of the primary under load, three rounds: nothing acknowledged lost, reads linearizable, sites converge, writes resume within 5 s")
    func killPrimaryRounds() async throws {
        let c = try makeCluster()
        defer { c.stopAll(); c.removeFiles() }
        try c.startAll()
        let report = try await FireDrill.run(c, rounds: 3, secondsPerRound: 3, writers: 6)
        print(report.json)
        #expect(report.passed, "\(report.text)")
        #expect(report.rounds.count == 3)
        for r in report.rounds {
            #expect(r.newPrimary != nil && r.newPrimary != r.killed)
            #expect((r.writesResumedAfter ?? 99) < 5, "\(report.text)")
        }
        #expect(report.acknowledged > 50, "\(report.text)")
    }

    @Test("kill -9 of the primary with clients behind HAProxy (Deploy/haproxy/haproxy.cfg's checks): traffic follows the probes, nothing acknowledged lost, the write pause under 3 s")
    func killPrimaryThroughHAProxy() async throws {
        #expect(HAProxyFront.isInstalled, "haproxy is installed (Deploy/setup.sh)")
        guard HAProxyFront.isInstalled else { return }
        var o = LocalCluster.Options()
        o.leaseMilliseconds = 2000  // the default lease: the issue's target is stated for it
        o.heartbeatMilliseconds = 500
        o.jitterMilliseconds = 300
        let c = try makeCluster { $0 = o }
        defer { c.stopAll(); c.removeFiles() }
        try c.startAll()
        let lb = try HAProxyFront(cluster: c)
        defer { lb.stop() }
        _ = await c.waitForPrimary()
        let report = try await FireDrill.run(c, rounds: 2, secondsPerRound: 5, writers: 6, through: ["haproxy": lb.writeURL])
        print(report.json)
        #expect(report.passed, "\(report.text)")
        for r in report.rounds { #expect(r.longestPause < 3, "write pause \(r.longestPause) s with the 2 s lease (target: under 3 s)") }
        #expect(report.acknowledged > 50)
    }

    @Test("the primary paused (SIGSTOP) beyond its lease, then resumed: no write or linearizable read from its old lease; it rejoins as a replica")
    func pausedPrimary() async throws {
        let c = try makeCluster()
        defer { c.stopAll(); c.removeFiles() }
        try c.startAll()
        let old = try #require(await c.waitForPrimary())
        // Clients go through the other sites, as a load balancer whose checks of the paused
        // site time out would send them (a paused process answers no one).
        let w = workload(c, through: c.options.sites.filter { $0 != old })
        w.start()
        try await sleep(1)
        let pausedAt = Date()
        c.signal(old, SIGSTOP)
        let next = await c.waitForPrimary(seconds: 10, excluding: old)
        #expect(next != nil && next != old)
        try await sleep(3 * Double(c.options.leaseMilliseconds) / 1000)
        c.signal(old, SIGCONT)
        // Its lease ran out while it was stopped: it must not claim the office again.
        for _ in 0..<10 {
            #expect((try? await HTTP.status("HEAD", c.url(old) + "/primary")) != 200, "the resumed primary claims a lease it lost")
            try await sleep(0.1)
        }
        var rejoined = false
        for _ in 0..<100 where !rejoined {
            let s = await c.status(old)
            rejoined = s?["role"] as? String == "follower" && s?["primary"] as? String == next
            if !rejoined { try await sleep(0.1) }
        }
        #expect(rejoined, "the resumed primary rejoined as a replica of \(next ?? "?")")
        try await sleep(1)
        await w.stop()
        #expect((w.firstAck(after: pausedAt) ?? 99) < 5, "writes resumed within 5 s of the pause")
        try await expectKept(c, w, "paused primary")
    }

    @Test("a primary cut off from the others (minority) steps down; the majority elects another; after healing it rejoins; nothing lost")
    func partitionedPrimary() async throws {
        let c = try makeCluster { $0.proxied = true }
        defer { c.stopAll(); c.removeFiles() }
        try c.startAll()
        let old = try #require(await c.waitForPrimary())
        let w = workload(c)
        w.start()
        try await sleep(1)
        let cutAt = Date()
        c.cut(old)
        let next = await c.waitForPrimary(seconds: 10, excluding: old)
        #expect(next != nil && next != old)
        // Within its lease (plus a check interval) the cut-off primary stops answering 200.
        try await sleep(2 * Double(c.options.leaseMilliseconds) / 1000)
        #expect((try? await HTTP.status("HEAD", c.url(old) + "/primary")) == 503, "the minority primary stepped down")
        let stale = try await HTTP.call("POST", c.url(old) + "/v1/query", token: c.token,
                                        json: ["sql": "SELECT count(*) FROM patients", "consistency": "local"])
        #expect(stale.status == 200 && stale.headers["tandem-stale"] == "true", "the cut-off site serves local reads marked stale")
        try await sleep(1)
        c.heal()
        try await sleep(3)
        await w.stop()
        #expect((w.firstAck(after: cutAt) ?? 99) < 5, "writes resumed within 5 s")
        try await expectKept(c, w, "partitioned primary")
    }

    @Test("a replica cut off from the others: writes go on; it leaves the read pool; after healing it catches up")
    func partitionedReplica() async throws {
        let c = try makeCluster { $0.proxied = true }
        defer { c.stopAll(); c.removeFiles() }
        try c.startAll()
        let primary = try #require(await c.waitForPrimary())
        let replica = try #require(c.options.sites.first { $0 != primary })
        // Clients go through the sites the load balancer keeps (the cut-off one would make
        // them wait for a primary it cannot reach).
        let w = workload(c, through: c.options.sites.filter { $0 != replica })
        w.start()
        try await sleep(1)
        let cutAt = Date()
        c.cut(replica)
        try await sleep(2 * Double(c.options.leaseMilliseconds) / 1000 + 0.5)
        #expect((try? await HTTP.status("HEAD", c.url(replica) + "/replica")) == 503, "the cut-off replica leaves the read pool")
        #expect(await c.primary() == primary, "the primary keeps its office with the other replica")
        #expect(w.longestPause(from: cutAt, to: Date()) < 1.5, "writes went on (longest pause \(w.longestPause(from: cutAt, to: Date())) s)")
        c.heal()
        try await sleep(3)
        #expect((try? await HTTP.status("HEAD", c.url(replica) + "/replica")) == 200, "back in the read pool after healing")
        await w.stop()
        try await expectKept(c, w, "partitioned replica")
    }

    @Test("a site restarted with an empty data directory rebuilds from its peers and rejoins")
    func emptyDataDirectory() async throws {
        let c = try makeCluster()
        defer { c.stopAll(); c.removeFiles() }
        try c.startAll()
        let primary = try #require(await c.waitForPrimary())
        let lost = try #require(c.options.sites.first { $0 != primary })
        let w = workload(c, through: c.options.sites.filter { $0 != lost })
        w.start()
        try await sleep(2)
        c.signal(lost, SIGKILL)
        try c.wipe(lost)
        try await sleep(1)
        try c.start(lost)  // --rejoin: it abstains from elections until it hears the primary
        try await sleep(3)
        await w.stop()
        try await expectKept(c, w, "empty data directory")
        let s = await c.status(lost)
        #expect(s?["role"] as? String == "follower")
        let log = try String(contentsOfFile: c.logPath(lost), encoding: .utf8)
        #expect(log.contains("event=rejoining") && log.contains("event=rejoined"), "the rebuilt site abstained, then rejoined")
    }

    @Test("switchover under load: no write fails, and the pause is measured")
    func switchoverUnderLoad() async throws {
        let c = try makeCluster()
        defer { c.stopAll(); c.removeFiles() }
        try c.startAll()
        let old = try #require(await c.waitForPrimary())
        let target = try #require(c.options.sites.first { $0 != old })
        let w = workload(c)
        w.start()
        try await sleep(1.5)
        let at = Date()
        let answer = try await HTTP.call("POST", c.url(old) + "/v1/admin/switchover", token: c.token, json: ["to": target])
        #expect(answer.status == 200, "\(String(decoding: answer.body, as: UTF8.self))")
        try await sleep(1.5)
        await w.stop()
        #expect(await c.primary() == target)
        let pause = w.longestPause(from: at.addingTimeInterval(-0.5), to: at.addingTimeInterval(1.5))
        print("switchover pause: \(String(format: "%.0f", pause * 1000)) ms")
        #expect(pause < 2, "writes paused \(pause) s")
        #expect(w.failures.isEmpty, "writes failed: \(w.failures.prefix(5))")
        #expect(w.unknownOutcomes.isEmpty, "writes with an unknown outcome: \(w.unknownOutcomes.prefix(5))")
        try await expectKept(c, w, "switchover")
    }
}
