import Foundation

extension SimulationResult {
    /// A timeline a person can read.
    public func readableReport(verbose: Bool = false) -> String {
        var out: [String] = []
        out.append("scenario \(scenario), seed \(seed): \(passed ? "PASSED" : "FAILED")")
        out.append(String(format: "  %.0f s simulated in %.3f s (%.0f× real time), %d events", virtualSeconds, wallSeconds, speedup, events))
        out.append("  lease reads: \(linearizableReads), each checked against every write acknowledged before it")
        out.append("  writes: \(writesProposed) proposed, \(writesAcknowledged) acknowledged, \(writesLost) acknowledged and lost, \(writesFailed) failed (no primary within 30 s)")
        out.append("  commit LSN \(finalCommitLSN); applied per site: " + finalAppliedLSN.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value) (lag \(finalCommitLSN > $0.value ? finalCommitLSN - $0.value : 0))" }.joined(separator: ", "))
        out.append("  largest lag during the run: " + maxLagRecords.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value) records" }.joined(separator: ", "))
        if failovers.isEmpty {
            out.append("  no failover")
        } else {
            out.append("  time without a primary:")
            for f in failovers {
                out.append(String(format: "    %8.3f s → %8.3f s: %.3f s, then %@ (term %llu)", f.fromSeconds, f.toSeconds, f.recoverySeconds, f.newPrimary, f.term))
            }
        }
        out.append("  timeline:")
        for (t, text) in timeline where verbose || !text.hasPrefix("(") {
            out.append(String(format: "    %8.3f s  ", t) + text)
        }
        if !passed {
            out.append("  VIOLATIONS:")
            for v in violations { out.append(String(format: "    %8.3f s  [%@] %@", v.timeSeconds, v.invariant, v.detail)) }
            out.append("  replay: tandem-sim <scenario file> --seed \(seed)")
        }
        if !passed || verbose {
            out.append("  trace (last \(trace.count) events):")
            for line in trace { out.append("    " + line) }
        }
        return out.joined(separator: "\n")
    }

    /// The result as a JSON object.
    public func jsonObject() -> [String: Any] {
        [
            "scenario": scenario, "seed": seed, "passed": passed,
            "virtual_seconds": virtualSeconds, "wall_seconds": wallSeconds, "speedup": speedup, "events": events,
            "writes_proposed": writesProposed, "writes_acknowledged": writesAcknowledged, "writes_lost": writesLost,
            "writes_failed": writesFailed, "linearizable_reads": linearizableReads, "final_commit_lsn": finalCommitLSN, "final_applied_lsn": finalAppliedLSN, "max_lag_records": maxLagRecords,
            "failovers": failovers.map { ["from_seconds": $0.fromSeconds, "to_seconds": $0.toSeconds, "recovery_seconds": $0.recoverySeconds,
                                          "new_primary": $0.newPrimary, "term": $0.term] as [String: Any] },
            "violations": violations.map { ["time_seconds": $0.timeSeconds, "invariant": $0.invariant, "detail": $0.detail] as [String: Any] },
            "timeline": timeline.map { ["time_seconds": $0.0, "event": $0.1] as [String: Any] },
        ]
    }

    /// A picture of the run: one lane per site showing its role over time, faults marked,
    /// and the commit LSN as a line.
    public func svg() -> String {
        let width = 1000.0, laneHeight = 28.0, left = 90.0, top = 30.0
        let plotWidth = width - left - 20
        let commitTop = top + Double(lanes.count) * (laneHeight + 8) + 20
        let commitHeight = 120.0
        let height = commitTop + commitHeight + 60
        func x(_ t: Double) -> Double { left + t / max(virtualSeconds, 1e-9) * plotWidth }
        let colors = ["primary": "#2e7d32", "follower": "#90a4ae", "witness": "#b0bec5", "candidate": "#f9a825", "down": "#c62828", "paused": "#ef6c00"]
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" font-family=\"sans-serif\" font-size=\"12\">\n"
        s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        s += "<text x=\"\(left)\" y=\"18\" font-size=\"14\">\(escape(scenario)) — seed \(seed) — \(passed ? "passed" : "FAILED")</text>\n"
        for (i, lane) in lanes.enumerated() {
            let y = top + Double(i) * (laneHeight + 8)
            s += "<text x=\"8\" y=\"\(y + laneHeight * 0.65)\">\(escape(lane.site))</text>\n"
            for (j, (start, state)) in lane.states.enumerated() {
                let end = j + 1 < lane.states.count ? lane.states[j + 1].0 : virtualSeconds
                let w = max(0.5, x(end) - x(start))
                s += "<rect x=\"\(fmt(x(start)))\" y=\"\(y)\" width=\"\(fmt(w))\" height=\"\(laneHeight)\" fill=\"\(colors[state] ?? "#eeeeee")\"><title>\(escape(lane.site)): \(state) from \(fmt(start)) s</title></rect>\n"
            }
        }
        for (t, label) in faultMarks {
            s += "<line x1=\"\(fmt(x(t)))\" y1=\"\(top - 6)\" x2=\"\(fmt(x(t)))\" y2=\"\(commitTop + commitHeight)\" stroke=\"black\" stroke-dasharray=\"4,3\"/>\n"
            s += "<text x=\"\(fmt(x(t) + 3))\" y=\"\(commitTop - 6)\" font-size=\"10\">\(escape(label))</text>\n"
        }
        let maxCommit = Double(commitProgress.map(\.1).max() ?? 1)
        let points = commitProgress.map { "\(fmt(x($0.0))),\(fmt(commitTop + commitHeight - Double($0.1) / max(maxCommit, 1) * commitHeight))" }.joined(separator: " ")
        s += "<rect x=\"\(left)\" y=\"\(commitTop)\" width=\"\(plotWidth)\" height=\"\(commitHeight)\" fill=\"none\" stroke=\"#cccccc\"/>\n"
        s += "<polyline fill=\"none\" stroke=\"#1565c0\" stroke-width=\"1.5\" points=\"\(points)\"/>\n"
        s += "<text x=\"8\" y=\"\(commitTop + 14)\">commit LSN</text><text x=\"8\" y=\"\(commitTop + 28)\">max \(Int(maxCommit))</text>\n"
        var lx = left
        for state in ["primary", "follower", "witness", "candidate", "paused", "down"] {
            s += "<rect x=\"\(fmt(lx))\" y=\"\(height - 30)\" width=\"12\" height=\"12\" fill=\"\(colors[state] ?? "")\"/><text x=\"\(fmt(lx + 16))\" y=\"\(height - 20)\">\(state)</text>\n"
            lx += 100
        }
        s += "<text x=\"\(left)\" y=\"\(height - 4)\" font-size=\"10\">0 s … \(fmt(virtualSeconds)) s</text>\n"
        s += "</svg>\n"
        return s
    }

    private func fmt(_ v: Double) -> String { String(format: "%.1f", v) }
    private func escape(_ v: String) -> String {
        v.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}
