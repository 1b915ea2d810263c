import Testing
import TandemCore
import TandemModel

@Suite("Protocol core")
struct CoreTests {
    @Test("a site rebuilt empty is caught up from LSN 1 (its old match is forgotten), and abstains until it hears the primary")
    func rebuiltSite() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 3000)
        let p = try #require(c.primaries.first)
        for i in 0..<5 { _ = try c.propose(p, "booking \(i)") }
        c.run(milliseconds: 500)
        let x = try #require(c.cores.keys.sorted().first { $0 != p })
        #expect(c.cores[x]!.log.lastLSN == c.cores[p]!.log.lastLSN)
        // x loses its disk and is rebuilt empty, without its term and vote.
        c.cores[x] = try Core(id: x, config: c.config, hardState: HardState(), log: LogView(), now: c.now, entropy: 3, abstaining: true)
        c.run(milliseconds: 1500)
        let rebuilt = try #require(c.cores[x])
        #expect(rebuilt.log.lastLSN == c.cores[p]!.log.lastLSN, "re-sent from the start")
        #expect(!rebuilt.abstaining)
        #expect(rebuilt.hardState.term == c.cores[p]!.hardState.term && rebuilt.hardState.votedFor == p,
                "the primary it heard is recorded as its vote in this term")
    }

    @Test("an abstaining site neither votes nor campaigns: with the primary gone, no one can be elected with its vote")
    func abstainingSiteDoesNotVote() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 3000)
        let p = try #require(c.primaries.first)
        let others = c.cores.keys.sorted().filter { $0 != p }
        c.cores[others[0]] = try Core(id: others[0], config: c.config, hardState: HardState(), log: LogView(), now: c.now, entropy: 3,
                                      abstaining: true)
        c.down.insert(p)
        c.run(milliseconds: 6000)
        #expect(c.primaries.isEmpty, "the abstaining site gave no vote, so no majority formed")
        #expect(c.cores[others[0]]!.role == .follower, "and it did not campaign")
    }

    @Test("three sites elect one primary, which commits a no-op, then writes, on a majority")
    func electAndCommit() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 3000)
        #expect(c.primaries.count == 1)
        let p = try #require(c.primaries.first)
        #expect(c.leaseHolders == [p], "the primary holds the lease once a majority acknowledged a round")
        let lsn = try c.propose(p, "booking 1")
        c.deliverAll()
        #expect(c.cores[p]?.commitLSN == lsn)
        c.run(milliseconds: 600)
        for id in c.cores.keys { #expect(c.committed[id] == lsn, "\(id) applies through \(lsn)") }
    }

    @Test("writes proposed as a group travel as one append per peer and one log append, and commit together")
    func groupProposal() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 3000)
        let p = try #require(c.primaries.first)
        var core = try #require(c.cores[p])
        let before = core.log.lastLSN
        let (first, ready) = try core.propose((1...5).map { (RecordKind.changeset, Array("booking \($0)".utf8)[...]) }, at: c.now)
        c.cores[p] = core
        #expect(first == before.next)
        #expect(ready.append.map(\.lsn) == (1...5).map { LSN(before.rawValue + UInt64($0)) }, "one durable append for the group")
        let appends = ready.messages.compactMap { m -> (SiteID, [LogRecord])? in
            if case let .append(a) = m.body, !a.records.isEmpty { return (m.to, a.records) } else { return nil }
        }
        #expect(appends.count == 2, "one message per peer, not one per write")
        for (_, records) in appends { #expect(records.count == 5) }
        c.perform(p, ready)
        c.deliverAll()
        #expect(c.cores[p]?.commitLSN == LSN(before.rawValue + 5))
    }

    @Test("a group that would pass the uncommitted limit is refused whole, and nothing of it is logged")
    func groupProposalLimit() throws {
        var small = try Cluster(["a", "b", "c"], maxUncommitted: 4)
        small.run(milliseconds: 3000)
        let q = try #require(small.primaries.first)
        var primary = try #require(small.cores[q])
        let last = primary.log.lastLSN
        #expect(throws: ProposalError.tooManyUncommitted(limit: 4)) {
            _ = try primary.propose((1...5).map { (RecordKind.changeset, Array("w\($0)".utf8)[...]) }, at: small.now)
        }
        #expect(primary.log.lastLSN == last, "no record of the refused group was appended")
        #expect(primary.uncommittedRoom == 4)
        #expect(primary.proposalRefusal(count: 5, at: small.now) == .tooManyUncommitted(limit: 4))
        #expect(primary.proposalRefusal(count: 4, at: small.now) == nil, "the driver may ask before it executes")
        let (_, ready) = try primary.propose((1...4).map { (RecordKind.changeset, Array("w\($0)".utf8)[...]) }, at: small.now)
        #expect(ready.append.count == 4, "a group within the limit is taken")
        #expect(primary.uncommittedRoom == 0)
        #expect(primary.proposalRefusal(count: 1, at: small.now) == .tooManyUncommitted(limit: 4))
    }

    @Test("no election happens before the lease a restart assumes has run out")
    func restartWaitsOutLease() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 1900)
        #expect(c.primaries.isEmpty, "promise duration is 2 s: nobody may grant a vote before")
        c.run(milliseconds: 800)
        #expect(c.primaries.count == 1)
    }

    @Test("a write commits only with a quorum: a primary cut off from both replicas commits nothing and steps down")
    func minorityPrimary() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 3000)
        let p = try #require(c.primaries.first)
        for other in ["a", "b", "c"].map({ SiteID($0) }) where other != p {
            c.cut.insert("\(p)>\(other)")
            c.cut.insert("\(other)>\(p)")
        }
        let before = c.cores[p]!.commitLSN
        _ = try c.propose(p, "lost write")
        c.run(milliseconds: 100)
        #expect(c.cores[p]!.commitLSN == before)
        // Its lease ends before the others may elect: never two holders.
        var overlap = false
        for _ in 0..<600 {
            c.run(milliseconds: 10)
            if c.leaseHolders.count > 1 { overlap = true }
        }
        #expect(!overlap)
        #expect(c.cores[p]!.role != .primary, "check-quorum made it step down")
        let newPrimary = try #require(c.primaries.first)
        #expect(newPrimary != p)
        // Healed: the old primary learns the new term and drops its uncommitted write.
        c.cut = []
        c.run(milliseconds: 1500)
        #expect(c.cores[p]!.hardState.term == c.cores[newPrimary]!.hardState.term)
        #expect(c.cores[p]!.log.lastLSN == c.cores[newPrimary]!.log.lastLSN)
    }

    @Test("the lease counts from when the acknowledged round was sent, shortened by the drift bound")
    func leaseFromSendTime() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 3000)
        let p = try #require(c.primaries.first)
        // Send a round, let answers arrive 300 ms later.
        let sentAt = c.now + 10_000_000
        c.now = sentAt - 10_000_000
        var lastRoundSent: Instant = 0
        for _ in 0..<60 {
            c.now += 10_000_000
            c.step(p, .tick)
            if c.mailbox.contains(where: { if case .append = $0.body { return $0.from == p } else { return false } }) {
                lastRoundSent = c.now
                break
            }
        }
        #expect(lastRoundSent > 0)
        c.now += 300_000_000
        c.deliverAll()
        let timing = c.config.timing
        let lease = try #require(c.cores[p]?.leaseUntil)
        #expect(lease == lastRoundSent + timing.primaryLeaseDuration, "not from the arrival time of the answers")
        #expect(timing.primaryLeaseDuration < timing.leaseDuration)
    }

    @Test("a voter that heard from a live primary refuses votes and does not even raise its term")
    func promiseBlocksVotes() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 3000)
        let p = try #require(c.primaries.first)
        let voter = try #require(["a", "b", "c"].map { SiteID($0) }.first { $0 != p })
        let candidate = try #require(["a", "b", "c"].map { SiteID($0) }.first { $0 != p && $0 != voter })
        let term = c.cores[voter]!.hardState.term
        c.step(voter, .message(Message(from: candidate, to: voter, term: Term(term.rawValue + 5),
                                        body: .vote(lastLSN: LSN(1000), lastTerm: Term(term.rawValue + 4), transfer: false))))
        #expect(c.cores[voter]!.hardState.term == term)
        #expect(c.mailbox.contains { m in
            if case .voteResponse(false, _, _) = m.body { return m.from == voter } else { return false }
        })
    }

    @Test("a deposed primary's late messages are refused by term")
    func staleTermRefused() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 3000)
        let p = try #require(c.primaries.first)
        let f = try #require(["a", "b", "c"].map { SiteID($0) }.first { $0 != p })
        let term = c.cores[f]!.hardState.term
        let last = c.cores[f]!.log.lastLSN
        let stale = LogRecord(term: Term(term.rawValue - 1 == 0 ? 0 : term.rawValue - 1), lsn: last.next, kind: .changeset, payload: [1])
        c.step(f, .message(Message(from: p, to: f, term: Term(0), body: .append(Append(prevLSN: last, prevTerm: term, records: [stale], commitLSN: last.next, round: 1)))))
        #expect(c.cores[f]!.log.lastLSN == last, "nothing appended from an old term")
        #expect(c.mailbox.contains { m in
            if case .appendResponse(let r) = m.body { return m.from == f && !r.success && m.term == term } else { return false }
        })
    }

    @Test("a switchover gives the lease up at once and hands over without waiting for it to expire")
    func switchover() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 3000)
        let p = try #require(c.primaries.first)
        let target = try #require(["a", "b", "c"].map { SiteID($0) }.first { $0 != p })
        c.step(p, .transferLeadership(to: target))
        #expect(!c.cores[p]!.canServeLeaseRead(at: c.now), "the lease is given up when the switchover starts")
        #expect(throws: ProposalError.switchoverInProgress) { _ = try c.propose(p, "during switchover") }
        c.deliverAll()
        c.run(milliseconds: 100)
        #expect(c.primaries == [target])
        c.run(milliseconds: 600)
        #expect(c.leaseHolders == [target])
    }

    @Test("a switchover to a site that cannot catch up aborts cleanly and the primary resumes")
    func switchoverAborts() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 3000)
        let p = try #require(c.primaries.first)
        let target = try #require(["a", "b", "c"].map { SiteID($0) }.first { $0 != p })
        c.cut.insert("\(p)>\(target)")
        _ = try c.propose(p, "x")
        c.deliverAll()
        c.step(p, .transferLeadership(to: target))
        c.run(milliseconds: 4500)
        #expect(c.roleChanges.contains { $0.0 == p && { if case .switchoverAborted = $0.1 { return true } else { return false } }($0) })
        #expect(c.primaries == [p])
        #expect(c.leaseHolders == [p])
        _ = try c.propose(p, "after abort")
    }

    @Test("majority-two-domains waits for a copy outside the primary's failure domain")
    func twoDomains() throws {
        var c = try Cluster(["a", "b", "c"], policy: .majorityTwoDomains, domains: ["sbg", "sbg", "gra"])
        c.run(milliseconds: 3000)
        let p = try #require(c.primaries.first)
        guard p != SiteID("c") else { return }
        c.cut.insert("\(p)>c")
        let lsn = try c.propose(p, "must leave the campus")
        c.deliverAll()
        #expect(c.cores[p]!.commitLSN < lsn, "the other Strasbourg site alone is not enough")
        c.cut = []
        c.run(milliseconds: 600)
        #expect(c.cores[p]!.commitLSN >= lsn)
    }

    @Test("settings are validated with the key that is wrong")
    func configValidation() {
        var t = Timing()
        t.heartbeatInterval = t.leaseDuration / 2
        #expect(throws: ConfigError.invalid("heartbeat_interval", "at most a third of lease_duration (2000 ms)")) { try t.validate() }
        let config = ClusterConfig(sites: [SiteDescriptor(id: "w", domain: "x", role: .witness)])
        #expect(throws: ConfigError.invalid("sites", "at least one voter")) { try config.validate() }
        let oneCampus = ClusterConfig(sites: ["a", "b", "c"].map { SiteDescriptor(id: SiteID($0), domain: "sbg") })
        #expect(oneCampus.placementWarnings.count == 2)
    }

    @Test("a witness holding records the surviving voter lacks lends them before the election")
    func witnessLendsRecords() throws {
        var c = try Cluster(["a", "b", "w"], witness: "w")
        c.run(milliseconds: 3000)
        // Make "a" the primary.
        if let p = c.primaries.first, p != SiteID("a") {
            c.step(p, .transferLeadership(to: "a"))
            c.run(milliseconds: 700)
        }
        #expect(c.primaries == ["a"])
        c.cut = ["a>b"]
        var last = LSN.zero
        for i in 0..<5 { last = try c.propose("a", "write \(i)") }
        c.deliverAll()
        #expect(c.cores["a"]!.commitLSN == last, "committed on a and the witness")
        #expect(c.cores["b"]!.log.lastLSN < last)
        c.down = ["a"]
        c.cut = []
        c.run(milliseconds: 4000)
        #expect(c.primaries == ["b"])
        #expect(c.cores["b"]!.log.term(at: last) != nil, "b fetched the committed records from the witness")
    }
}

@Suite("Read-your-writes gate")
struct ReadGateTests {
    @Test("a read waits until its LSN is applied, or its deadline, within a bound on waiting reads")
    func gate() {
        var g = ReadGate<Int>(maxWaiting: 2)
        #expect(g.wait(1, minLSN: LSN(5), appliedLSN: LSN(5), deadline: 100) == .ready)
        #expect(g.wait(2, minLSN: LSN(7), appliedLSN: LSN(5), deadline: 100) == .waiting)
        #expect(g.wait(3, minLSN: LSN(9), appliedLSN: LSN(5), deadline: 50) == .waiting)
        #expect(g.wait(4, minLSN: LSN(9), appliedLSN: LSN(5), deadline: 50) == .refused(limit: 2))
        #expect(g.applied(LSN(6)).isEmpty)
        #expect(g.applied(LSN(8)) == [2])
        #expect(g.expire(now: 49).isEmpty)
        #expect(g.expire(now: 50) == [3])
        #expect(g.count == 0)
    }
}

@Suite("Reads without clocks")
struct ReadIndexTests {
    @Test("a ReadIndex read is confirmed by a majority round, and refused on a site that is not primary")
    func readIndex() throws {
        var c = try Cluster(["a", "b", "c"])
        c.run(milliseconds: 3000)
        let p = try #require(c.primaries.first)
        let f = try #require(["a", "b", "c"].map { SiteID($0) }.first { $0 != p })
        let lsn = try c.propose(p, "visible to the read")
        c.deliverAll()
        var core = c.cores[p]!
        let ready = core.step(.readIndex(id: 1), at: c.now, entropy: 1)
        c.cores[p] = core
        #expect(ready.readsReady.isEmpty, "not before a majority confirmed the round")
        var confirmed: [(id: UInt64, lsn: LSN)] = []
        for m in ready.messages { c.mailbox.append(m) }
        // Deliver by hand and watch the primary's answers.
        while !c.mailbox.isEmpty {
            let m = c.mailbox.removeFirst()
            guard var target = c.cores[m.to] else { continue }
            let r = target.step(.message(m), at: c.now, entropy: 1)
            c.cores[m.to] = target
            confirmed.append(contentsOf: r.readsReady)
            c.mailbox.append(contentsOf: r.messages + r.messagesAfterPersist)
        }
        #expect(confirmed.count == 1 && confirmed[0].id == 1 && confirmed[0].lsn >= lsn)
        var follower = c.cores[f]!
        #expect(follower.step(.readIndex(id: 2), at: c.now, entropy: 1).readsFailed == [2])
    }
}
