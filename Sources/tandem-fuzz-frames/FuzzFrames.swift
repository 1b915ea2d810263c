import TandemTransport
#if canImport(Glibc)
import Glibc
#endif

/// libFuzzer entry point: feeds arbitrary bytes to the frame decoder and the message and
/// hello decoders. Any crash, hang or sanitizer report is a bug. See docs/WIRE.md.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFrames(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    var limits = WireLimits()
    limits.maxFrameBytes = 1 << 20
    limits.maxRecordBlockBytes = 4 << 20
    var decoder = FrameDecoder(limits: limits)
    guard size > 0 else { return 0 }
    // Received in reads of a size the input's first byte picks, frames taken out after
    // each, as a connection does: a large frame's header then arrives before its body,
    // which the decoder receives into an array of its own.
    let read = 1 + Int(data[0]) * 16
    let input = UnsafeRawBufferPointer(start: data + 1, count: size - 1)
    var offset = 0
    do {
        repeat {
            let n = decoder.receive(atMost: read) { room in
                let k = min(room.count, input.count - offset)
                room.copyMemory(from: UnsafeRawBufferPointer(rebasing: input[offset..<(offset + k)]))
                return k
            }
            offset += n
            while let frame = try decoder.next() {
                switch frame.type {
                case .hello: _ = try FrameDecoder.hello(frame.body)
                case .message: _ = try decoder.message(frame.body)
                case .goodbye, .ping: break
                case .snapshot: _ = try SnapshotFrame.decode(frame.body)
                case .forward: _ = try ForwardFrame.decode(frame.body)
                }
            }
        } while offset < input.count
    } catch {
        // Refusing malformed input is the expected outcome.
    }
    return 0
}

#if FUZZING
/// SwiftPM links an executable's entry point under the module's name; hand it to
/// libFuzzer's driver.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<Int32>,
                         _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> Int32) -> Int32

@_cdecl("tandem_fuzz_frames_main")
public func fuzzMain(_ argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> Int32 {
    var count = argc
    var vector = argv
    return LLVMFuzzerRunDriver(&count, &vector, fuzzFrames)
}
#else
/// Without libFuzzer (a normal build), replays files given as arguments through the
/// same entry point: corpus inputs and crash reproducers.
@main
struct ReplayFrames {
    static func main() {
        let args = CommandLine.arguments.dropFirst()
        if args.isEmpty {
            print("usage: tandem-fuzz-frames FILE... (replays inputs; for fuzzing see docs/WIRE.md)")
            return
        }
        for path in args {
            guard let f = fopen(path, "rb") else {
                print("\(path): cannot open")
                continue
            }
            var bytes: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = fread(&buf, 1, buf.count, f)
                if n <= 0 { break }
                bytes.append(contentsOf: buf[0..<n])
            }
            fclose(f)
            _ = bytes.withUnsafeBufferPointer { fuzzFrames($0.baseAddress ?? UnsafePointer(bitPattern: 1)!, $0.count) }
            print("\(path): \(bytes.count) bytes, no crash")
        }
    }
}
#endif
