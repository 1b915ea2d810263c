import Testing
@testable import TandemCore
import TandemModel

@Suite("The core's log view")
struct LogViewTests {
    /// What the view must hold: the live records and the bounds, kept the simple way.
    struct Model {
        var firstLSN = LSN(1)
        var lastLSN = LSN.zero
        var cached: [LogRecord] = []
        var cachedBytes: Int { cached.reduce(0) { $0 + LogView.cachedBytes($1) } }

        mutating func append(_ records: [LogRecord], maxCachedBytes: Int) {
            cached += records
            lastLSN = records.last?.lsn ?? lastLSN
            while cached.count > 1 && cachedBytes > maxCachedBytes { cached.removeFirst() }
        }

        mutating func truncate(after lsn: LSN) {
            guard lsn < lastLSN else { return }
            cached.removeAll { $0.lsn > lsn }
            lastLSN = lsn
        }

        mutating func compact(through lsn: LSN) {
            guard lsn >= firstLSN, lsn <= lastLSN else { return }
            firstLSN = lsn.next
            cached.removeAll { $0.lsn <= lsn }
        }
    }

    static func check(_ view: LogView, _ model: Model) {
        #expect(view.firstLSN == model.firstLSN)
        #expect(view.lastLSN == model.lastLSN)
        let shape = view.cacheShape
        #expect(shape.live == model.cached.count)
        #expect(shape.bytes == model.cachedBytes, "bytes counted")
        // Dropped slots are shed once they are half of the array. (Its capacity is
        // checked in the steady state below: a truncation or a large append may leave it
        // larger for a while, as any array.)
        #expect(shape.slots <= max(1, 2 * shape.live), "\(shape.slots) slots for \(shape.live) cached records")
        guard model.lastLSN >= model.firstLSN else { return }
        for lsn in model.firstLSN.rawValue...model.lastLSN.rawValue {
            let expected = model.cached.first { $0.lsn.rawValue == lsn }
            #expect(view.cachedRecord(at: LSN(lsn)) == expected, "record \(lsn)")
            for maxBytes in [0, 100, 500, 1 << 30] {
                let run = view.cachedRecords(from: LSN(lsn), maxBytes: maxBytes)
                if let first = model.cached.first, lsn >= first.lsn.rawValue {
                    // At least one record, then as many as fit in maxBytes of payload.
                    var want: [LogRecord] = []
                    var bytes = 0
                    for r in model.cached where r.lsn.rawValue >= lsn {
                        if !want.isEmpty && bytes + r.payload.count > maxBytes { break }
                        want.append(r)
                        bytes += r.payload.count
                    }
                    #expect(run == want, "records from \(lsn), at most \(maxBytes) bytes")
                } else {
                    #expect(run == nil, "records from \(lsn) are not cached")
                }
            }
        }
    }

    @Test("random appends, truncations, compactions and resets keep the cache equal to a model (records, bytes counted, runs at every byte limit), its array within twice its records, and equal views equal and hashing alike")
    func cacheMatchesModel() {
        var rng = SeededRandom(seed: 7)
        for round in 0..<40 {
            let maxCachedBytes = 2_000 + Int(rng.next() % 4_000)
            var view = LogView()
            var model = Model()
            var term: UInt64 = 1
            for _ in 0..<150 {
                switch rng.next() % 10 {
                case 0:
                    let lsn = LSN(rng.next() % (view.lastLSN.rawValue + 1))
                    if lsn >= view.firstLSN.previous {
                        view.truncate(after: lsn)
                        model.truncate(after: lsn)
                    }
                case 1:
                    // Mostly inside the log, sometimes outside it (which changes nothing).
                    let span = UInt64(Int(view.lastLSN.rawValue) - Int(view.firstLSN.rawValue) + 3)  // at least 2
                    let lsn = LSN(view.firstLSN.rawValue - 1 + rng.next() % span)
                    view.compact(through: lsn)
                    model.compact(through: lsn)
                case 2 where rng.next() % 10 == 0:
                    // A snapshot installed: an empty log after some LSN.
                    let lsn = LSN(view.lastLSN.rawValue + rng.next() % 5)
                    view.reset(after: lsn, term: Term(term))
                    model = Model(firstLSN: lsn.next, lastLSN: lsn, cached: [])
                default:
                    if rng.next() % 8 == 0 { term += 1 }
                    let records = (0..<(1 + Int(rng.next() % 6))).map { i in
                        LogRecord(term: Term(term), lsn: LSN(view.lastLSN.rawValue + 1 + UInt64(i)), kind: .changeset,
                                  payload: [UInt8](repeating: UInt8(i), count: Int(rng.next() % 400)))
                    }
                    view.append(records, maxCachedBytes: maxCachedBytes)
                    model.append(records, maxCachedBytes: maxCachedBytes)
                }
                Self.check(view, model)
                if !model.cached.isEmpty, round % 10 == 0 {
                    // The same log reached another way (one append, one trim) is the same
                    // view, whatever dropped slots either still holds.
                    var again = LogView(after: view.firstLSN.previous, term: view.term(at: view.firstLSN.previous) ?? .zero)
                    var all: [LogRecord] = []
                    var from = view.firstLSN
                    while from <= view.lastLSN, let r = view.cachedRecord(at: from) {
                        all.append(r)
                        from = from.next
                    }
                    if all.count == Int(view.lastLSN.rawValue - view.firstLSN.rawValue + 1) {
                        again.append(all, maxCachedBytes: maxCachedBytes)
                        #expect(again == view)
                        #expect(again.hashValue == view.hashValue)
                        // And a view that differs in one record's payload is not equal.
                        var other = LogView(after: view.firstLSN.previous, term: view.term(at: view.firstLSN.previous) ?? .zero)
                        var changed = all
                        changed[changed.count - 1].payload.append(0xFF)
                        other.append(changed, maxCachedBytes: maxCachedBytes + 1)
                        #expect(other != view)
                    }
                }
            }
        }
    }

    @Test("a full cache stays bounded over many appends: its array's slots and capacity never pass twice its records")
    func fullCacheStaysBounded() {
        var view = LogView()
        let payload = [UInt8](repeating: 1, count: 300)
        let maxCachedBytes = 100 * LogView.cachedBytes(LogRecord(term: Term(1), lsn: LSN(1), kind: .changeset, payload: payload))
        for lsn in 1...20_000 {
            view.append([LogRecord(term: Term(1), lsn: LSN(UInt64(lsn)), kind: .changeset, payload: payload)], maxCachedBytes: maxCachedBytes)
            let shape = view.cacheShape
            if shape.live != 100 && lsn >= 100 { Issue.record("\(shape.live) cached at \(lsn)"); return }
            // Twice the records, and what malloc's rounding adds to an array's capacity,
            // once the first shedding has sized the array to the records (before it, the
            // array grows by doubling as any array does).
            if shape.slots > 200 || (lsn > 400 && shape.capacity > 232) { Issue.record("\(shape.slots) slots, capacity \(shape.capacity) at \(lsn)"); return }
        }
        #expect(view.cachedRecord(at: LSN(19_901))?.lsn == LSN(19_901))
        #expect(view.cachedRecord(at: LSN(19_900)) == nil)
    }
}
