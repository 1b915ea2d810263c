import Testing
import TandemDrill

@Suite("Drill workload")
struct WorkloadTests {
    @Test("booking slots never repeat, however many a run books (a 28-day wrap made fast runs fail with slot_taken)")
    func slotsAreDistinct() {
        #expect(Workload.slotStart(year: 2030, slot: 0, minutes: 30) == "2030-01-01T00:00:00Z")
        #expect(Workload.slotStart(year: 2030, slot: 3, minutes: 30) == "2030-01-01T01:30:00Z")
        // Where the old formula wrapped back to 1 January.
        #expect(Workload.slotStart(year: 2030, slot: 48 * 28, minutes: 30) == "2030-01-29T00:00:00Z")
        #expect(Workload.slotStart(year: 2030, slot: 48 * 365, minutes: 30) == "2031-01-01T00:00:00Z")
        let starts = (0..<200_000).map { Workload.slotStart(year: 2031, slot: $0, minutes: 30) }
        #expect(Set(starts).count == starts.count)
    }
}
