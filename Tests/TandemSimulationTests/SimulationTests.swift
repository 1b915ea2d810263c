import Foundation
import Testing
import TandemCore
@testable import TandemSimulation

/// The scenario files shipped in Simulations/.
let scenarioFiles: [String] = {
    let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Simulations").path
    let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
    return names.filter { $0.hasSuffix(".json") }.sorted().map { dir + "/" + $0 }
}()

/// Seeds per scenario: 100 by default (the release build runs them in seconds);
/// TANDEM_SIM_SEEDS lowers it for a quick debug run.
let seedsPerScenario = Int(ProcessInfo.processInfo.environment["TANDEM_SIM_SEEDS"] ?? "") ?? 100

@Suite("Disaster simulations")
struct SimulationTests {
    @Test("the shipped scenarios exist and parse")
    func scenariosParse() throws {
        #expect(scenarioFiles.count >= 10)
        for name in ["strasbourg-fire", "two-datacenters-and-witness", "primary-in-minority-partition", "flapping-inter-datacenter-link",
                     "clock-drift", "rolling-restart", "slow-disk", "switchover-under-load", "long-outage-then-rejoin", "lost-disk-rebuild"] {
            #expect(scenarioFiles.contains { $0.hasSuffix("/\(name).json") }, "\(name) is missing")
        }
        for f in scenarioFiles { _ = try Scenario.load(path: f) }
    }

    @Test("every scenario holds its invariants over many seeds", arguments: scenarioFiles)
    func sweep(file: String) throws {
        let scenario = try Scenario.load(path: file)
        for seed in 1...UInt64(seedsPerScenario) {
            let result = Simulator(scenario: scenario, seed: seed).run()
            if !result.passed {
                Issue.record("\(result.readableReport())")
                return
            }
            #expect(result.writesAcknowledged > 0 || scenario.workload.writesPerSecond == 0)
        }
    }

    @Test("the same scenario and seed replay the same run exactly")
    func deterministic() throws {
        let scenario = try Scenario.load(path: try #require(scenarioFiles.first { $0.hasSuffix("strasbourg-fire.json") }))
        let a = Simulator(scenario: scenario, seed: 42).run()
        let b = Simulator(scenario: scenario, seed: 42).run()
        #expect(a.events == b.events)
        #expect(a.timeline.map(\.1) == b.timeline.map(\.1))
        #expect(a.finalAppliedLSN == b.finalAppliedLSN)
        #expect(a.writesAcknowledged == b.writesAcknowledged)
        let c = Simulator(scenario: scenario, seed: 43).run()
        #expect(c.events != a.events || c.timeline.map(\.0) != a.timeline.map(\.0))
    }

    /// No writes, so every site stays as up to date as the primary; the link between
    /// Strasbourg and Gravelines breaks. Whichever of them is not primary stops hearing it,
    /// and only the promise rule keeps Roubaix from electing it while the primary's lease runs.
    static let quietPartition = """
    {"name": "quiet-partition", "duration_seconds": 20,
     "sites": [{"id": "sbg", "domain": "strasbourg"}, {"id": "gra", "domain": "gravelines"}, {"id": "rbx", "domain": "roubaix"}],
     "network": {"latency_ms": {"strasbourg-gravelines": 9, "strasbourg-roubaix": 8, "gravelines-roubaix": 3}},
     "workload": {"writes_per_second": 0},
     "faults": [{"at_seconds": 5, "action": "partition", "groups": [["sbg"], ["gra"]]},
                {"at_seconds": 12, "action": "heal"}],
     "expect": {"recover_within_seconds": 5}}
    """

    @Test("the checkers catch a core that grants votes while a lease runs")
    func catchesLeaseFlaw() throws {
        let scenario = try Scenario.parse(json: Self.quietPartition)
        var caught: SimulationResult?
        for seed in 1...30 as ClosedRange<UInt64> {
            #expect(Simulator(scenario: scenario, seed: seed).run().passed, "the correct core passes seed \(seed)")
            let r = Simulator(scenario: scenario, seed: seed, flaw: .grantVotesDuringLease).run()
            if !r.passed {
                caught = r
                break
            }
        }
        let r = try #require(caught, "a flawed core went unnoticed for 30 seeds")
        #expect(r.violations.contains { $0.invariant == "single-lease" || $0.invariant == "one-primary-per-term" })
        #expect(r.readableReport().contains("replay: tandem-sim"))
        #expect(!r.trace.isEmpty)
    }

    @Test("the checkers catch a core that commits without a quorum")
    func catchesQuorumFlaw() throws {
        let scenario = try Scenario.load(path: try #require(scenarioFiles.first { $0.hasSuffix("primary-in-minority-partition.json") }))
        var caught = false
        for seed in 1...30 as ClosedRange<UInt64> where !Simulator(scenario: scenario, seed: seed, flaw: .commitWithoutQuorum).run().passed {
            caught = true
            break
        }
        #expect(caught)
    }

    @Test("a site rebuilt on an empty disk abstains until it hears a primary: a core that votes at once lets a stale site win and lose acknowledged writes, and the checkers catch it")
    func catchesVoteAfterLostDisk() throws {
        let scenario = try Scenario.load(path: try #require(scenarioFiles.first { $0.hasSuffix("lost-disk-rebuild.json") }))
        var caught = 0
        for seed in 1...10 as ClosedRange<UInt64> {
            #expect(Simulator(scenario: scenario, seed: seed).run().passed, "the correct core passes seed \(seed)")
            let r = Simulator(scenario: scenario, seed: seed, flaw: .ignoreAbstention).run()
            if !r.passed && r.writesLost > 0 { caught += 1 }
        }
        #expect(caught > 0, "a core that votes right after losing its disk went unnoticed for 10 seeds")
    }

    @Test("a bad scenario file names the file, the key and what was expected", arguments: [
        ("{\"name\": \"x\", \"duration_seconds\": 10, \"sites\": [{\"id\": \"a\", \"domain\": \"d\"}], \"bogus\": 1}", "bogus", "one of the known keys"),
        ("{\"name\": \"x\", \"duration_seconds\": \"ten\", \"sites\": []}", "duration_seconds", "a number"),
        ("{\"name\": \"x\", \"duration_seconds\": 10, \"sites\": [{\"id\": \"a\", \"domain\": \"d\", \"role\": \"boss\"}]}", "sites[0].role", "\"voter\" or \"witness\""),
        ("{\"name\": \"x\", \"duration_seconds\": 10, \"sites\": [{\"id\": \"a\", \"domain\": \"d\"}], \"faults\": [{\"at_seconds\": 1, \"action\": \"crash\", \"site\": \"zz\"}]}", "faults[0].site", "a configured site id"),
        ("{\"name\": \"x\", \"duration_seconds\": 10, \"sites\": [{\"id\": \"a\", \"domain\": \"d\"}], \"faults\": [{\"at_seconds\": 1, \"action\": \"explode\"}]}", "faults[0].action", "one of crash"),
        ("{\"name\": \"x\", \"duration_seconds\": 10, \"sites\": [{\"id\": \"a\", \"domain\": \"d\"}], \"timing\": {\"lease_ms\": 900, \"heartbeat_ms\": 500}}", "timing", "heartbeat_interval"),
        ("{\"name\": \"x\", \"duration_seconds\": 10, \"sites\": [{\"id\": \"a\", \"domain\": \"d\"}], \"commit_policy\": \"eventually\"}", "commit_policy", "majority"),
        ("[1, 2]", "", "an object"),
    ])
    func badScenario(json: String, key: String, expected: String) {
        do {
            _ = try Scenario.parse(json: json, file: "Simulations/mine.json")
            Issue.record("accepted")
        } catch {
            #expect(error.file == "Simulations/mine.json")
            #expect(error.key.hasPrefix(key), "\(error)")
            #expect(error.expected.contains(expected), "\(error)")
        }
    }

    @Test("the report has a timeline, JSON and an SVG picture")
    func outputs() throws {
        let scenario = try Scenario.load(path: try #require(scenarioFiles.first { $0.hasSuffix("strasbourg-fire.json") }))
        let r = Simulator(scenario: scenario, seed: 3).run()
        #expect(r.readableReport().contains("fire: campus strasbourg lost"))
        #expect(r.failovers.contains { $0.fromSeconds >= 12 && $0.recoverySeconds < 5 })
        let data = try JSONSerialization.data(withJSONObject: r.jsonObject())
        #expect(data.count > 100)
        let svg = r.svg()
        #expect(svg.hasPrefix("<svg") && svg.contains("fire: campus strasbourg lost") && svg.contains("polyline"))
    }
}

@Suite("Clock drift beyond the bound")
struct BeyondBoundTests {
    @Test("beyond the drift bound leases really do overlap (the relaxed check is not vacuous), yet no acknowledged write is lost")
    func overlapIsReal() throws {
        let file = try #require(scenarioFiles.first { $0.hasSuffix("clock-drift-beyond-bound.json") })
        var strict = try Scenario.load(path: file)
        strict.expect.allowLeaseOverlap = false
        var overlaps = 0
        for seed in 1...20 as ClosedRange<UInt64> {
            let r = Simulator(scenario: strict, seed: seed).run()
            if r.violations.contains(where: { $0.invariant == "single-lease" || $0.invariant == "linearizable-read" }) { overlaps += 1 }
            #expect(!r.violations.contains { $0.invariant == "acknowledged-writes-kept" || $0.invariant == "committed-prefix" },
                    "terms keep every acknowledged write even when leases overlap (seed \(seed))")
        }
        #expect(overlaps > 0, "a 20% slow clock against a 1% bound must produce an overlap in 20 seeds")
    }
}
