import ArgumentParser
import Foundation
import TandemCore
import TandemSimulation

/// Replays datacenter disasters against the real core in virtual time.
@main
struct TandemSim: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tandem-sim",
        abstract: "Replay datacenter disasters deterministically, in virtual time.",
        discussion: "A scenario file (see Simulations/README.md) describes sites, network, workload, faults and expectations. The same scenario, seed and build replay the same run exactly.")

    @Argument(help: "Scenario files (JSON).") var scenarios: [String]
    @Option(help: "Run this one seed.") var seed: UInt64?
    @Option(help: "Sweep this many seeds (1...N).") var seeds: Int?
    @Option(help: "First seed of a sweep.") var firstSeed: UInt64 = 1
    @Flag(help: "Print JSON (one object per run) instead of the readable timeline.") var json = false
    @Option(help: "Write an SVG picture of the (single) run.") var svg: String?
    @Flag(help: "Show the whole timeline.") var verbose = false
    @Flag(help: "Trace every delivered message (with a violation, the trace is printed).") var traceMessages = false
    @Option(help: "Trace lines to keep.") var traceLines = 400
    @Option(help: "Build the core with a deliberate flaw (to see the checkers catch it): \(Core.TestingFlaw.allCases.map(\.rawValue).joined(separator: ", ")).")
    var flaw: String?

    func run() throws {
        var flawValue: Core.TestingFlaw?
        if let flaw {
            guard let f = Core.TestingFlaw(rawValue: flaw) else { throw ValidationError("unknown flaw \"\(flaw)\"") }
            flawValue = f
        }
        var failures = 0
        var runs = 0
        for path in scenarios {
            let scenario: Scenario
            do { scenario = try Scenario.load(path: path) } catch {
                FileHandle.standardError.write(Data("tandem-sim: \(error)\n".utf8))
                throw ExitCode(2)
            }
            let list: [UInt64] = seeds.map { n in (0..<UInt64(max(0, n))).map { firstSeed + $0 } } ?? [seed ?? firstSeed]
            var wall = 0.0
            var virtual = 0.0
            var worstRecovery = 0.0
            var scenarioFailures = 0
            for s in list {
                var simulator = Simulator(scenario: scenario, seed: s, flaw: flawValue)
                simulator.traceMessages = traceMessages
                simulator.traceLimit = traceLines
                let result = simulator.run()
                runs += 1
                wall += result.wallSeconds
                virtual += result.virtualSeconds
                worstRecovery = max(worstRecovery, result.failovers.map(\.recoverySeconds).max() ?? 0)
                if !result.passed { scenarioFailures += 1 }
                if json {
                    let data = try JSONSerialization.data(withJSONObject: result.jsonObject(), options: [.sortedKeys])
                    print(String(decoding: data, as: UTF8.self))
                } else if list.count == 1 || !result.passed {
                    print(result.readableReport(verbose: verbose))
                }
                if let svg, list.count == 1 {
                    try result.svg().write(toFile: svg, atomically: true, encoding: .utf8)
                }
            }
            failures += scenarioFailures
            if list.count > 1 && !json {
                print(String(format: "%@: %d seeds, %d passed, %d failed; worst time without a primary %.3f s; %.0f s simulated in %.2f s (%.0f×)",
                             scenario.name, list.count, list.count - scenarioFailures, scenarioFailures, worstRecovery, virtual, wall, virtual / max(wall, 1e-9)))
            }
        }
        if runs > 1 && !json { print("\(runs - failures) passed, \(failures) failed") }
        if failures > 0 { throw ExitCode(1) }
    }
}
