import ArgumentParser
import Foundation
import TandemDrill

/// Fire drills on real tandemd processes: a telehealth workload, the primary killed with
/// SIGKILL (as a fire would), and a report of what happened and what was kept.
@main
struct TandemDrillCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tandem-drill",
        abstract: "Kill the primary of a Tandem cluster under a telehealth workload and report what was kept.",
        discussion: """
        With --local DIR it drills the cluster Deploy/local-cluster.sh runs there (killing a site by its pid file and
        restarting it with the script). Without, it starts its own three sites on loopback from the tandemd next to
        this program, and removes them afterwards. Exits 1 if an acknowledged write was lost, a read was not
        linearizable, or the sites did not converge.
        """)

    @Option(help: "The directory of a cluster started by Deploy/local-cluster.sh ($TANDEM_LOCAL).") var local: String?
    @Option(help: "How many times to kill the primary.") var rounds = 3
    @Option(help: "Seconds of workload per round.") var seconds = 6.0
    @Option(help: "Concurrent writers.") var writers = 8
    @Option(help: "The Deploy directory (make-certs.sh, local-cluster.sh).") var deploy = "Deploy"

    func run() async throws {
        let cluster: any ClusterControl
        var own: LocalCluster?
        defer {
            own?.stopAll()
            own?.removeFiles()
        }
        if let local {
            cluster = try ScriptedLocalCluster(root: local, script: deploy + "/local-cluster.sh")
        } else {
            let bin = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path
            let c = try LocalCluster(binDirectory: bin, deployDirectory: deploy)
            own = c
            try c.startAll()
            cluster = c
        }
        print("fire drill: \(rounds) rounds, \(writers) writers booking teleconsultations through every site, 2 linearizable readers")
        let report = try await FireDrill.run(cluster, rounds: rounds, secondsPerRound: seconds, writers: writers) { print($0) }
        print(report.text)
        print(report.json)
        if !report.passed { throw ExitCode(1) }
    }
}
