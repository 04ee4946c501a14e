package agent

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/veilmesh/veil/api"
	"google.golang.org/protobuf/proto"
)

// cacheMagic starts a config cache file: the format's name and version, then the
// snapshot as a serialized api.Push with full set.
const cacheMagic = "veil-config-cache v1\n"

// writeCache stores a full snapshot in path atomically: a temporary file in the same
// directory, synced, renamed over path, and the directory synced, so a crash leaves the
// old cache or the new one, never a torn one. The file is readable by its owner only.
func writeCache(path string, p *api.Push) error {
	if !p.GetFull() {
		return errors.New("agent: config cache: not a full snapshot")
	}
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(p)
	if err != nil {
		return fmt.Errorf("agent: config cache: %w", err)
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("agent: config cache: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(append([]byte(cacheMagic), data...))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("agent: config cache: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// readCache loads a snapshot written by writeCache. A missing file is
// os.ErrNotExist; anything else that is not a cache is an error naming the file.
func readCache(path string) (*api.Push, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	body, ok := bytes.CutPrefix(data, []byte(cacheMagic))
	if !ok {
		return nil, fmt.Errorf("agent: config cache %s: not a veil config cache (want it to start with %q)", path, cacheMagic[:len(cacheMagic)-1])
	}
	p := &api.Push{}
	if err := proto.Unmarshal(body, p); err != nil {
		return nil, fmt.Errorf("agent: config cache %s: %w", path, err)
	}
	if !p.GetFull() || p.GetEpoch() == "" || p.GetVersion() == 0 {
		return nil, fmt.Errorf("agent: config cache %s: not a full snapshot with an epoch and version", path)
	}
	return p, nil
}
