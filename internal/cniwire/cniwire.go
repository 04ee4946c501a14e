// Package cniwire is what the veil-cni plugin and the agent say to each other over the
// agent's root-only unix socket: one request per connection, a JSON object sent in a
// single message together with the pod's network namespace as a descriptor
// (SCM_RIGHTS, so the agent never has to find the runtime's netns path), and one JSON
// answer.
package cniwire

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
)

// MaxMessage bounds a request or an answer.
const MaxMessage = 64 << 10

// Request asks the agent to enroll (ADD) or release (DEL) a pod.
type Request struct {
	Command string `json:"command"` // "ADD" or "DEL"
	// ContainerID is the sandbox's ID (CNI_CONTAINERID).
	ContainerID string `json:"containerID"`
	// The pod, as the plugin read it from the API server at this moment.
	UID            string            `json:"uid"`
	Namespace      string            `json:"namespace"`
	Name           string            `json:"name"`
	ServiceAccount string            `json:"serviceAccount,omitempty"`
	Labels         map[string]string `json:"labels,omitempty"`
	// NamespaceLabels are the pod's namespace's labels.
	NamespaceLabels map[string]string `json:"namespaceLabels,omitempty"`
	// IPs are the addresses the interface plugin gave the pod (prevResult).
	IPs []netip.Addr `json:"ips,omitempty"`
}

// Validate checks what the agent relies on.
func (r *Request) Validate() error {
	switch r.Command {
	case "ADD":
		if r.UID == "" || r.Namespace == "" || r.Name == "" {
			return errors.New("cni request: uid, namespace and name are required")
		}
		if len(r.IPs) == 0 {
			return fmt.Errorf("cni request for pod %s/%s: no pod IPs (is veil-cni chained after the plugin that assigns them?)", r.Namespace, r.Name)
		}
		for i, ip := range r.IPs {
			if !ip.IsValid() {
				return fmt.Errorf("cni request for pod %s/%s: ips[%d] is not an address", r.Namespace, r.Name, i)
			}
		}
	case "DEL":
		if r.UID == "" && r.ContainerID == "" {
			return errors.New("cni request: DEL needs the pod uid or the container id")
		}
	default:
		return fmt.Errorf("cni request: command %q must be ADD or DEL", r.Command)
	}
	return nil
}

// Answer is the agent's reply. Error is empty on success.
type Answer struct {
	Error string `json:"error,omitempty"`
}

// Send sends r, with netns (may be nil) attached, over c and waits for the answer
// until the deadline.
func Send(c *net.UnixConn, r *Request, netnsFile *os.File, deadline time.Time) (*Answer, error) {
	b, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	if len(b) > MaxMessage {
		return nil, fmt.Errorf("cni request of %d bytes exceeds %d", len(b), MaxMessage)
	}
	c.SetDeadline(deadline)
	var oob []byte
	if netnsFile != nil {
		oob = syscall.UnixRights(int(netnsFile.Fd()))
	}
	if _, _, err := c.WriteMsgUnix(b, oob, nil); err != nil {
		return nil, fmt.Errorf("send to the agent: %w", err)
	}
	buf := make([]byte, MaxMessage)
	n, err := c.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("the agent's answer: %w", err)
	}
	var a Answer
	if err := json.Unmarshal(buf[:n], &a); err != nil {
		return nil, fmt.Errorf("the agent's answer: %w", err)
	}
	return &a, nil
}

// Receive reads one request from c: the request and the descriptor sent with it (nil
// when none). The caller closes the file.
func Receive(c *net.UnixConn, deadline time.Time) (*Request, *os.File, error) {
	c.SetDeadline(deadline)
	buf := make([]byte, MaxMessage+1)
	oob := make([]byte, syscall.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, nil, fmt.Errorf("cni request: %w", err)
	}
	var f *os.File
	if oobn > 0 {
		msgs, err := syscall.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, nil, fmt.Errorf("cni request: control message: %w", err)
		}
		for _, m := range msgs {
			fds, err := syscall.ParseUnixRights(&m)
			if err != nil {
				continue
			}
			for _, fd := range fds {
				if f == nil {
					f = os.NewFile(uintptr(fd), "netns")
				} else {
					syscall.Close(fd) // one descriptor only; close any extra
				}
			}
		}
	}
	fail := func(err error) (*Request, *os.File, error) {
		if f != nil {
			f.Close()
		}
		return nil, nil, err
	}
	if flags&(syscall.MSG_TRUNC|syscall.MSG_CTRUNC) != 0 || n > MaxMessage {
		return fail(fmt.Errorf("cni request: larger than %d bytes or with too many descriptors", MaxMessage))
	}
	var r Request
	if err := json.Unmarshal(buf[:n], &r); err != nil {
		return fail(fmt.Errorf("cni request: %w", err))
	}
	if err := r.Validate(); err != nil {
		return fail(err)
	}
	return &r, f, nil
}

// Reply writes the answer to err (nil: success).
func Reply(c *net.UnixConn, err error) error {
	a := Answer{}
	if err != nil {
		a.Error = err.Error()
	}
	b, _ := json.Marshal(a)
	_, werr := c.Write(b)
	return werr
}
