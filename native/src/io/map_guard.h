// MapGuard: read-only file maps that survive their file being cut short.
//
// Why: a file truncated while it is mapped raises SIGBUS on every read past its new end,
// which kills the process mid-merge: no message, and the merge's temporary files left
// behind. The guard's SIGBUS handler recognises a read of a registered map, maps zero
// pages over the rest of that map (so the read, retried, sees zeros and the kernels run
// on), and marks the map as faulted. The merge checks its inputs after every batch
// (lib/checkpoint/model.ts, changed()) and abandons the merge with a message naming the
// file, before anything of that batch is handed out as output.
//
// The handler is installed on the first registration and passes faults outside
// registered maps to the action it replaced (with none before, such a fault kills the
// process with SIGBUS as it would have). A handler installed after it takes every
// SIGBUS, the guard's included, until guard_in_front puts the guard back in front of it
// (every registration does, and the addon calls it before each batch reads its maps).
// Registration and the handler share a table of lock-free slots, grown in chunks; a map
// registered when every slot is taken is unguarded.
#pragma once
#include <cstddef>

namespace della_io {

// Registers the map [addr, addr + size) (size rounded up to whole pages); returns its
// slot, or -1 when the table is full or the handler could not be installed.
int guard_map(void* addr, size_t size);

// Whether a read of the map in `slot` faulted since guard_map; false for slot -1.
bool map_faulted(int slot);

// Forgets the map in `slot` (nothing for -1). Call before munmap: once the range is
// unmapped, a later mapping at the same address is not the guard's to patch.
void unguard_map(int slot);

// Puts the guard's handler back in front of one installed after it (which becomes the
// one faults outside guarded maps go to); one sigaction call when it already is. False
// when the handler could not be installed.
bool guard_in_front();

// The most maps guarded at once: above the kernel's default limit on a process's
// mappings (vm.max_map_count, 65530).
constexpr int kMapGuardSlots = 32 * 4096;

}  // namespace della_io
