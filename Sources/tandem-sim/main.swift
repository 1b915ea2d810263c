import Foundation

// The simulator arrives with the core (issue 3); until then it says so and fails.
FileHandle.standardError.write(Data("tandem-sim: the simulator is not built yet (see the core and simulation issue)\n".utf8))
exit(2)
