import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A telehealth workload against a cluster, recording what a checker needs: every
/// booking acknowledged (and when), every one that failed visibly or with an unknown
/// outcome, and every linearizable read with what it saw. Writers book non-overlapping
/// slots for their own practitioner, so every booking should succeed; each targets the
/// sites in turn (any site forwards to the primary).
public final class Workload: @unchecked Sendable {
    public struct Ack: Sendable {
        public var key: String
        public var lsn: Int
        public var invoked: Date
        public var acknowledged: Date
    }

    public struct Read: Sendable {
        public var site: String
        public var invoked: Date
        public var completed: Date
        public var seen: Set<String>
    }

    public let urls: [String: String]
    public let token: String
    public let writers: Int
    public let readers: Int
    private let lock = NSLock()
    // Guarded by `lock`.
    private var acks: [Ack] = []
    private var invoked: [String: Date] = [:]
    private var failed: [String: String] = [:]  // key → status and code
    private var unknown: [String: String] = [:]
    private var reads: [Read] = []
    private var readErrors: [String: Int] = [:]
    private var running = false
    private var stopped: Date?
    private var tasks: [Task<Void, Never>] = []
    private let prefix = "D\(Int(Date().timeIntervalSince1970) % 100_000)"

    /// Where readers send their linearizable reads (default: `urls`).
    public let readURLs: [String: String]

    public init(urls: [String: String], token: String, writers: Int = 8, readers: Int = 2, readURLs: [String: String]? = nil) {
        self.urls = urls
        self.readURLs = readURLs ?? urls
        self.token = token
        self.writers = writers
        self.readers = readers
    }

    public func start() {
        lock.withLock { running = true }
        let sites = urls.keys.sorted()
        for w in 0..<writers {
            tasks.append(Task { [self] in
                var k = 0
                while lock.withLock({ running }) {
                    let site = sites[(w + k) % sites.count]
                    await book(writer: w, k: k, site: site)
                    k += 1
                }
            })
        }
        let readSites = readURLs.keys.sorted()
        for r in 0..<readers {
            tasks.append(Task { [self] in
                var k = 0
                while lock.withLock({ running }) {
                    await read(site: readSites[(r + k) % readSites.count])
                    k += 1
                    try? await Task.sleep(nanoseconds: 20_000_000)
                }
            })
        }
    }

    public func stop() async {
        lock.withLock {
            running = false
            stopped = Date()
        }
        for t in tasks { await t.value }
        tasks = []
    }

    /// The start of the `slot`-th slot of `minutes` from the start of `year` (UTC), as
    /// the API takes it: distinct for every slot, however many a run books.
    public static func slotStart(year: Int, slot: Int, minutes: Int) -> String {
        var t = tm()
        t.tm_year = Int32(year - 1900)
        t.tm_mday = 1
        var seconds = timegm(&t) + time_t(slot) * time_t(minutes) * 60
        var out = tm()
        gmtime_r(&seconds, &out)
        return String(format: "%04d-%02d-%02dT%02d:%02d:00Z", Int(out.tm_year) + 1900, Int(out.tm_mon) + 1, Int(out.tm_mday),
                      Int(out.tm_hour), Int(out.tm_min))
    }

    /// When the clients stopped (nil while running): the end of any pause measured.
    public var stoppedAt: Date? { lock.withLock { stopped } }

    private func book(writer w: Int, k: Int, site: String) async {
        let key = "\(prefix)-\(w)-\(k)"
        // Each writer's practitioner has one 20-minute slot every 30 minutes, never the
        // same one twice (wrapping after 28 days, as this did, made a fast run's last
        // bookings fail with 409 slot_taken).
        let start = Self.slotStart(year: 2030, slot: k, minutes: 30)
        let body: [String: Any] = ["practitioner": "\(prefix)-DR-\(w)", "patient": key, "starts_at": start,
                                   "duration_minutes": 20, "mode": "video"]
        let at = Date()
        lock.withLock { invoked[key] = at }
        do {
            let a = try await HTTP.call("POST", urls[site]! + "/v1/appointments", token: token, json: body, timeout: 20)
            let done = Date()
            if a.status == 201, let lsn = a.json["lsn"] as? Int {
                lock.withLock { acks.append(Ack(key: key, lsn: lsn, invoked: at, acknowledged: done)) }
            } else if a.errorCode == "outcome_unknown" || (a.status >= 500 && a.errorCode == nil) {
                // A 5xx without Tandem's JSON error comes from a load balancer, which may have
                // cut a request a site was carrying out: the outcome is unknown.
                lock.withLock { unknown[key] = "\(a.status) \(a.errorCode ?? "from the load balancer")" }
            } else {
                lock.withLock { failed[key] = "\(a.status) \(a.errorCode ?? "")" }
                if a.status == 503 { try? await Task.sleep(nanoseconds: 50_000_000) }
            }
        } catch {
            // The connection broke or could not be made (the site died). Even "could not
            // connect" is no proof: the HTTP client may have sent the request on a pooled
            // connection before retrying on a new one. The write may or may not have committed.
            lock.withLock { unknown[key] = "\(error)" }
            try? await Task.sleep(nanoseconds: 50_000_000)
        }
    }

    private func read(site: String) async {
        let at = Date()
        do {
            let a = try await HTTP.call("POST", readURLs[site]! + "/v1/query", token: token,
                                        json: ["sql": "SELECT reference FROM patients WHERE reference LIKE ?", "params": ["\(prefix)-%"],
                                               "consistency": "linearizable"], timeout: 20)
            guard a.status == 200, let rows = a.json["rows"] as? [[Any]] else {
                lock.withLock { readErrors["\(a.status) \(a.errorCode ?? "")", default: 0] += 1 }
                return
            }
            let seen = Set(rows.compactMap { $0.first as? String })
            lock.withLock { reads.append(Read(site: site, invoked: at, completed: Date(), seen: seen)) }
        } catch {
            lock.withLock { readErrors["transport", default: 0] += 1 }
        }
    }

    // MARK: Results

    public var acknowledged: [Ack] { lock.withLock { acks } }
    public var failures: [String: String] { lock.withLock { failed } }
    public var unknownOutcomes: [String: String] { lock.withLock { unknown } }
    public var readFailures: [String: Int] { lock.withLock { readErrors } }
    public var readCount: Int { lock.withLock { reads.count } }

    /// The longest time without any acknowledged write, between `from` and `to`.
    public func longestPause(from: Date, to: Date) -> Double {
        let times = (acknowledged.map(\.acknowledged).filter { $0 > from && $0 < to } + [to]).sorted()
        var last = from, gap = 0.0
        for t in times {
            gap = max(gap, t.timeIntervalSince(last))
            last = t
        }
        return gap
    }

    /// How long after `date` the first write *sent* after it was acknowledged (a reply to a
    /// write sent before the fault says nothing about recovery).
    public func firstAck(after date: Date) -> Double? {
        acknowledged.filter { $0.invoked > date }.map(\.acknowledged).min().map { $0.timeIntervalSince(date) }
    }

    /// Linearizable reads that broke linearizability: a read must show every write
    /// acknowledged before it began, and nothing invoked after it completed.
    public func linearizabilityViolations() -> [String] {
        let (acks, reads, invoked) = lock.withLock { (self.acks, self.reads, self.invoked) }
        var out: [String] = []
        for r in reads {
            for a in acks where a.acknowledged < r.invoked && !r.seen.contains(a.key) {
                out.append("a read on \(r.site) begun \(r.invoked) missed \(a.key), acknowledged at \(a.acknowledged)")
            }
            for key in r.seen where (invoked[key] ?? .distantPast) > r.completed {
                out.append("a read on \(r.site) completed \(r.completed) saw \(key), invoked later")
            }
        }
        return out
    }
}

/// The checks after a drill healed.
public enum DrillCheck {
    /// Acknowledged bookings missing on each site (asked locally once it has applied the
    /// highest acknowledged LSN), and every booking present anywhere.
    public static func check(_ cluster: any ClusterControl, _ workload: Workload, sites: [String]) async throws
        -> (missing: [String: [String]], present: Set<String>) {
        let acks = workload.acknowledged
        let minLSN = acks.map(\.lsn).max() ?? 0
        var missing: [String: [String]] = [:]
        var present: Set<String> = []
        for s in sites {
            let a = try await HTTP.call("POST", cluster.url(s) + "/v1/query", token: cluster.token, json: [
                "sql": "SELECT reference FROM patients", "consistency": "local", "min_lsn": minLSN, "timeout_ms": 30_000,
            ], timeout: 40)
            guard a.status == 200, let rows = a.json["rows"] as? [[Any]] else {
                throw DrillError("\(s) did not answer the check: \(a.status) \(String(decoding: a.body, as: UTF8.self))")
            }
            let have = Set(rows.compactMap { $0.first as? String })
            present.formUnion(have)
            let lost = acks.map(\.key).filter { !have.contains($0) }
            if !lost.isEmpty { missing[s] = lost }
        }
        return (missing, present)
    }

    /// Every site's state hash at a common LSN (asked until they stand at the same one).
    public static func converged(_ cluster: any ClusterControl, sites: [String], seconds: Double = 30) async throws -> (Bool, [String: String]) {
        let end = Date().addingTimeInterval(seconds)
        var last: [String: String] = [:]
        while Date() < end {
            var hashes: [String: (Int, String)] = [:]
            for s in sites {
                let o = try await HTTP.json("GET", cluster.url(s) + "/v1/admin/state-hash", token: cluster.token)
                hashes[s] = (o["lsn"] as? Int ?? -1, o["state_hash"] as? String ?? "")
            }
            last = hashes.mapValues { "\($0.0):\($0.1)" }
            if Set(hashes.values.map(\.0)).count == 1 {
                return (Set(hashes.values.map(\.1)).count == 1, last)
            }
            try await Task.sleep(nanoseconds: 200_000_000)
        }
        return (false, last)
    }
}
