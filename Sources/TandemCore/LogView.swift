import TandemModel

/// The core's view of its local log: bounds, the term of every LSN (as runs of equal
/// term), and a bounded cache of recent records for sending to peers. Older records are
/// read from the log through `LogReadRequest`.
public struct LogView: Hashable, Sendable {
    /// First retained LSN (after a snapshot, the one after it).
    public private(set) var firstLSN: LSN
    /// Term of the record just before `firstLSN` (the snapshot's).
    public private(set) var previousTerm: Term
    public private(set) var lastLSN: LSN
    public private(set) var lastTerm: Term
    /// (first LSN of the run, term), ascending; covers firstLSN...lastLSN.
    private var runs: [Run] = []
    /// Contiguous records ending at `lastLSN`: `cache[cacheHead...]`. Slots before
    /// `cacheHead` were dropped (their payloads released) and are removed from the array
    /// only once they are at least half of it: removing them one by one shifted the whole
    /// cache, and once the cache was full that was every append (61% of a primary's loop
    /// after 170,000 writes of 256 bytes, throughput halved). The slots cost at most
    /// twice a record's stride per cached record.
    private var cache: [LogRecord] = []
    private var cacheHead = 0
    private var cacheBytes = 0

    struct Run: Hashable, Sendable {
        var lsn: LSN
        var term: Term
    }

    /// An empty log that starts after `lsn` (term `term`): LSN 0, term 0 for a new site.
    public init(after lsn: LSN = .zero, term: Term = .zero) {
        firstLSN = lsn.next
        previousTerm = term
        lastLSN = lsn
        lastTerm = term
    }

    /// A view of an existing log from its records' terms. `records` must be contiguous
    /// from `firstLSN`; they also fill the cache (trimmed to `maxCachedBytes`).
    public init(firstLSN: LSN, previousTerm: Term, records: [LogRecord], maxCachedBytes: Int) {
        self.init(after: firstLSN.previous, term: previousTerm)
        append(records, maxCachedBytes: maxCachedBytes)
    }

    /// A view of an existing log from its bounds and its term runs (first LSN of each run
    /// of equal terms, ascending), with an empty cache: records are read from the log.
    public init(firstLSN: LSN, previousTerm: Term, lastLSN: LSN, termRuns: [(lsn: LSN, term: Term)]) {
        self.init(after: firstLSN.previous, term: previousTerm)
        guard lastLSN >= firstLSN else { return }
        runs = termRuns.filter { $0.lsn <= lastLSN }.map { Run(lsn: max($0.lsn, firstLSN), term: $0.term) }
        self.lastLSN = lastLSN
        lastTerm = runs.last?.term ?? previousTerm
    }

    /// The term of the record at `lsn`; `previousTerm` just before the first; nil outside.
    public func term(at lsn: LSN) -> Term? {
        if lsn == firstLSN.previous { return previousTerm }
        guard lsn >= firstLSN, lsn <= lastLSN else { return nil }
        // Runs are few (one per term); search from the end, where lookups cluster.
        var i = runs.count - 1
        while i >= 0 {
            if runs[i].lsn <= lsn { return runs[i].term }
            i -= 1
        }
        return nil
    }

    /// Whether a log ending at (`lsn`, `term`) is at least as up to date as this one.
    public func isAtMostAsUpToDate(asLSN lsn: LSN, term: Term) -> Bool {
        term > lastTerm || (term == lastTerm && lsn >= lastLSN)
    }

    /// What the cache counts for a record beyond its payload: the record itself in memory,
    /// and its share of the frame it arrived in (21 bytes of header; a received record's
    /// payload shares that frame's memory, see docs/ARCHITECTURE.md).
    static let recordOverheadBytes = MemoryLayout<LogRecord>.stride + 24

    /// What the cache counts for `r`.
    static func cachedBytes(_ r: LogRecord) -> Int { r.payload.count + recordOverheadBytes }

    /// Appends contiguous records.
    mutating func append(_ records: [LogRecord], maxCachedBytes: Int) {
        for r in records {
            precondition(r.lsn == lastLSN.next, "log view: record \(r.lsn) does not follow \(lastLSN)")
            if runs.last?.term != r.term { runs.append(Run(lsn: r.lsn, term: r.term)) }
            lastLSN = r.lsn
            lastTerm = r.term
            cache.append(r)
            cacheBytes += Self.cachedBytes(r)
        }
        trimCache(maxCachedBytes)
    }

    /// Drops every record after `lsn`.
    mutating func truncate(after lsn: LSN) {
        guard lsn < lastLSN else { return }
        while let last = runs.last, last.lsn > lsn { runs.removeLast() }
        while cache.count > cacheHead, let last = cache.last, last.lsn > lsn {
            cacheBytes -= Self.cachedBytes(last)
            cache.removeLast()
        }
        shedDroppedSlots()
        lastLSN = lsn
        lastTerm = term(at: lsn) ?? previousTerm
    }

    /// Forgets records up to `lsn` (covered by a snapshot).
    mutating func compact(through lsn: LSN) {
        guard lsn >= firstLSN, lsn <= lastLSN, let t = term(at: lsn) else { return }
        previousTerm = t
        firstLSN = lsn.next
        while runs.count > 1, runs[1].lsn <= firstLSN { runs.removeFirst() }
        if !runs.isEmpty { runs[0].lsn = max(runs[0].lsn, firstLSN) }
        if lsn == lastLSN { runs.removeAll() }
        if let first = firstCached, first.lsn <= lsn {
            // Contiguous: the records up to `lsn` are the first lsn - first + 1.
            dropCached(min(Int(lsn.rawValue - first.lsn.rawValue) + 1, cache.count - cacheHead))
        }
    }

    /// Replaces everything by an empty log continuing after `lsn` (a snapshot install).
    mutating func reset(after lsn: LSN, term: Term) {
        self = LogView(after: lsn, term: term)
    }

    /// Drops the oldest cached records until at most `maxBytes` are counted (always
    /// keeping the newest record).
    private mutating func trimCache(_ maxBytes: Int) {
        guard cacheBytes > maxBytes else { return }
        var drop = 0
        var bytes = cacheBytes
        while cacheHead + drop < cache.count - 1, bytes > maxBytes {
            bytes -= Self.cachedBytes(cache[cacheHead + drop])
            drop += 1
        }
        dropCached(drop)
    }

    /// The oldest cached record.
    private var firstCached: LogRecord? { cacheHead < cache.count ? cache[cacheHead] : nil }

    /// An empty record that takes a dropped record's slot, so that its payload is released.
    private static let droppedSlot = LogRecord(term: .zero, lsn: .zero, kind: .noop, payload: [])

    /// Drops the `count` oldest cached records: their slots are emptied and the head
    /// moves past them; the array sheds the dead slots once they are half of it, so each
    /// live record is moved at most once per time its slot count doubles (amortized O(1)).
    private mutating func dropCached(_ count: Int) {
        guard count > 0 else { return }
        for i in cacheHead..<(cacheHead + count) {
            cacheBytes -= Self.cachedBytes(cache[i])
            cache[i] = Self.droppedSlot
        }
        cacheHead += count
        shedDroppedSlots()
    }

    /// Removes the dropped slots once they are at least half of the array. The live
    /// records move to a new array of their own size (shifting them would keep the old
    /// capacity, which growth by doubling then took to four times the records), so the
    /// array's capacity stays within twice the cached records.
    private mutating func shedDroppedSlots() {
        if cacheHead == cache.count {
            cache = []
            cacheHead = 0
            cacheBytes = 0
        } else if cacheHead > 0 && cacheHead * 2 >= cache.count {
            cache = Array(cache[cacheHead...])
            cacheHead = 0
        }
    }

    /// Cached records, slots (live and dropped) and the array's capacity, and the bytes
    /// counted: for tests of the cache's bounds.
    var cacheShape: (live: Int, slots: Int, capacity: Int, bytes: Int) {
        (cache.count - cacheHead, cache.count, cache.capacity, cacheBytes)
    }

    /// Records from `from` on, up to `maxBytes` of payload (at least one), if the cache
    /// holds `from`; nil when they must be read from the log.
    func cachedRecords(from: LSN, maxBytes: Int) -> [LogRecord]? {
        guard from <= lastLSN else { return [] }
        guard let first = firstCached, from >= first.lsn else { return nil }
        let start = cacheHead + Int(from.rawValue - first.lsn.rawValue)
        var out: [LogRecord] = []
        var bytes = 0
        var i = start
        while i < cache.count {
            let r = cache[i]
            if !out.isEmpty && bytes + r.payload.count > maxBytes { break }
            out.append(r)
            bytes += r.payload.count
            i += 1
        }
        return out
    }

    /// The cached record at `lsn`, if cached.
    func cachedRecord(at lsn: LSN) -> LogRecord? {
        guard let first = firstCached, lsn >= first.lsn, lsn <= lastLSN else { return nil }
        return cache[cacheHead + Int(lsn.rawValue - first.lsn.rawValue)]
    }

    /// Equal when the logs are: bounds, terms and the cached records, whatever the dead
    /// slots not yet shed.
    public static func == (a: LogView, b: LogView) -> Bool {
        a.firstLSN == b.firstLSN && a.previousTerm == b.previousTerm && a.lastLSN == b.lastLSN && a.lastTerm == b.lastTerm
            && a.runs == b.runs && a.cacheBytes == b.cacheBytes && a.cache[a.cacheHead...].elementsEqual(b.cache[b.cacheHead...])
    }

    public func hash(into h: inout Hasher) {
        h.combine(firstLSN)
        h.combine(previousTerm)
        h.combine(lastLSN)
        h.combine(lastTerm)
        h.combine(runs)
        h.combine(cacheBytes)
        h.combine(cache.count - cacheHead)
        for r in cache[cacheHead...] { h.combine(r) }
    }
}
