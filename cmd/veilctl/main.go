// Command veilctl is the operator CLI for veil:
//
//	veilctl policy check -f DIR --from ID --to NS/NAME --port N [HTTP flags]
//	veilctl lab up|status|exec|apply|delete|demo|down
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
  lab            a veil mesh in network namespaces on this machine: up, status, exec, apply, demo, down

Run "veilctl policy check -h" for its flags.
`

// run is the whole program; tests call it.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) >= 2 && args[0] == "policy" && args[1] == "check" {
		return policyCheck(ctx, args[2:], stdout, stderr)
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
