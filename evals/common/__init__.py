"""What every evaluation command shares: argument types, method specs, timing, the machine's description."""
