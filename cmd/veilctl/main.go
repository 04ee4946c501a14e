// Command veilctl is the operator CLI for veil:
//
//	veilctl policy check -f DIR --from ID --to NS/NAME --port N [HTTP flags]
//	veilctl policy explain --from NS/POD --to NS/POD:PORT
//	veilctl describe pod NS/NAME
//	veilctl certs NS/NAME
//	veilctl lab up|status|exec|apply|delete|demo|down
//	veilctl waypoint apply|generate|list|delete
//
// policy check evaluates a connection or an HTTP request against a directory of
// security.istio.io YAML and prints the decision and its reason; lab runs a veil mesh in
// network namespaces on this machine.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "veilctl:", err)
		}
		os.Exit(2)
	}
}

const usage = `veilctl: the veil operator CLI.

Commands:
  policy check   evaluate a connection or HTTP request against a directory of Istio policy YAML
  policy explain the decision for a connection between two pods, from the destination's agent
  describe pod   a pod's mesh membership, identity, effective mTLS per port, policies in scope
  certs          a pod's certificate chain, SPIFFE ID, validity and time to rotation
  lab            a veil mesh in network namespaces on this machine: up, status, exec, apply, demo, down
  waypoint       waypoints as istioctl waypoint makes them: apply, generate, list, delete

describe, certs and policy explain ask an agent's admin endpoint: --admin URL (default
http://localhost:15000, the agent of the node you are on), or --lab NAME for a lab's agents.

Run "veilctl policy check -h" for its flags.
`

// run is the whole program; tests call it.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) >= 2 && args[0] == "policy" && args[1] == "check" {
		return policyCheck(ctx, args[2:], stdout, stderr)
	}
	if len(args) >= 2 && args[0] == "policy" && args[1] == "explain" {
		return policyExplain(ctx, args[2:], stdout, stderr)
	}
	if len(args) >= 2 && args[0] == "describe" && args[1] == "pod" {
		return describePod(ctx, args[2:], stdout, stderr)
	}
	if len(args) >= 1 && args[0] == "certs" {
		return certs(ctx, args[1:], stdout, stderr)
	}
	if len(args) >= 1 && args[0] == "waypoint" {
		return waypointCmd(ctx, args[1:], stdout, stderr)
	}
	if len(args) >= 1 && args[0] == "lab" {
		return labCmd(ctx, args[1:], os.Stdin, stdout, stderr)
	}
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", args)
}
