package policy

import (
	"errors"
	"sync"
	"sync/atomic"
)

// Store holds the last good version of every object and workload and publishes compiled
// Snapshots. The zero value is ready to use with default Options; set Options before first use.
// A Store is safe for concurrent use: writers are serialised, and Snapshot is a lock-free atomic
// load, so the data path never waits for a compile.
type Store struct {
	// Options apply to validation and compilation. Do not change them after first use.
	Options Options

	// mu serialises writers and guards objects and workloads.
	mu        sync.Mutex
	objects   map[Key]*Object
	workloads map[WorkloadKey]*Workload

	snap atomic.Pointer[Snapshot]
}

var emptySnapshot = Compile(nil, nil, Options{})

// Snapshot returns the current snapshot. It never returns nil, takes no lock and does not
// allocate.
func (s *Store) Snapshot() *Snapshot {
	if p := s.snap.Load(); p != nil {
		return p
	}
	return emptySnapshot
}

// Apply validates each object and, if valid, adds it or replaces the object with the same kind,
// namespace and name. An invalid object is rejected alone: the previous version of that object,
// if any, stays in force, and its errors are returned (joined; each an *ObjectError). The
// snapshot is recompiled once per call, so pass many objects at once. Apply blocks while another
// writer compiles.
func (s *Store) Apply(objs ...*Object) (warnings []string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	var errs []error
	changed := false
	for _, o := range objs {
		w, verr := Validate(o, s.Options)
		warnings = append(warnings, w...)
		if verr != nil {
			errs = append(errs, verr)
			continue
		}
		s.objects[o.Key()] = o
		changed = true
	}
	if changed {
		s.publish()
	}
	return warnings, errors.Join(errs...)
}

// Delete removes objects. Unknown keys are ignored.
func (s *Store) Delete(keys ...Key) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	for _, k := range keys {
		delete(s.objects, k)
	}
	s.publish()
}

// SetWorkloads adds or replaces workloads (by namespace/name).
func (s *Store) SetWorkloads(ws ...*Workload) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	for _, w := range ws {
		s.workloads[WorkloadKey{w.Namespace, w.Name}] = w
	}
	s.publish()
}

// ReplaceWorkloads makes ws the store's workloads: those not in ws are removed.
func (s *Store) ReplaceWorkloads(ws ...*Workload) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	next := make(map[WorkloadKey]*Workload, len(ws))
	for _, w := range ws {
		next[WorkloadKey{w.Namespace, w.Name}] = w
	}
	s.workloads = next
	s.publish()
}

// DeleteWorkloads removes workloads.
func (s *Store) DeleteWorkloads(keys ...WorkloadKey) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	for _, k := range keys {
		delete(s.workloads, k)
	}
	s.publish()
}

// init allocates the maps; s.mu must be held.
func (s *Store) init() {
	if s.objects == nil {
		s.objects = map[Key]*Object{}
		s.workloads = map[WorkloadKey]*Workload{}
	}
}

// publish compiles and swaps in a new snapshot; s.mu must be held.
func (s *Store) publish() {
	objs := make([]*Object, 0, len(s.objects))
	for _, o := range s.objects {
		objs = append(objs, o)
	}
	ws := make([]*Workload, 0, len(s.workloads))
	for _, w := range s.workloads {
		ws = append(ws, w)
	}
	s.snap.Store(Compile(objs, ws, s.Options))
}
