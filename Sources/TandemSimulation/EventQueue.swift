/// Virtual time in nanoseconds since the start of a simulation (real time, as opposed to
/// each site's drifting clock).
public typealias VirtualTime = UInt64

/// A min-heap of events ordered by time, then by insertion order, so equal times replay
/// in the same order on every run. The heap holds small keys; payloads sit in a slot
/// array, so sifting moves 24 bytes instead of whole events.
struct EventQueue<Payload> {
    private var heap: [(time: VirtualTime, seq: UInt64, slot: Int32)] = []
    private var slots: [Payload?] = []
    private var free: [Int32] = []
    private var sequence: UInt64 = 0

    var isEmpty: Bool { heap.isEmpty }
    var count: Int { heap.count }
    var nextTime: VirtualTime? { heap.first?.time }

    mutating func push(_ time: VirtualTime, _ payload: Payload) {
        sequence += 1
        let slot: Int32
        if let f = free.popLast() {
            slot = f
            slots[Int(f)] = payload
        } else {
            slot = Int32(slots.count)
            slots.append(payload)
        }
        heap.append((time, sequence, slot))
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard less(i, parent) else { break }
            heap.swapAt(i, parent)
            i = parent
        }
    }

    mutating func pop() -> (time: VirtualTime, payload: Payload)? {
        guard !heap.isEmpty else { return nil }
        heap.swapAt(0, heap.count - 1)
        let top = heap.removeLast()
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < heap.count && less(l, m) { m = l }
            if r < heap.count && less(r, m) { m = r }
            if m == i { break }
            heap.swapAt(i, m)
            i = m
        }
        let payload = slots[Int(top.slot)].take()
        free.append(top.slot)
        guard let payload else { return nil }
        return (top.time, payload)
    }

    private func less(_ a: Int, _ b: Int) -> Bool {
        heap[a].time < heap[b].time || (heap[a].time == heap[b].time && heap[a].seq < heap[b].seq)
    }
}
