"""Speed on this machine: the device, its precision and memory format, the threads' and the heap's policy, and the
compiled C kernels (csrc/). Imports only the base."""
