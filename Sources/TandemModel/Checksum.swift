import CCRC32C

/// CRC32C (Castagnoli), computed with the SSE4.2 instruction where the CPU has it.
public enum CRC32C {
    public static func checksum(_ bytes: UnsafeRawBufferPointer, extending crc: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return crc }
        return tandem_crc32c_extend(crc, base, bytes.count)
    }

    public static func checksum(_ bytes: [UInt8], extending crc: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, extending: crc) }
    }

    /// Whether the hardware instruction is in use (reported by benchmarks).
    public static var isHardwareAccelerated: Bool { tandem_crc32c_hardware() != 0 }
}
