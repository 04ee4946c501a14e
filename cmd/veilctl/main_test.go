package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

func TestPolicyCheck(t *testing.T) {
	cases := []struct {
		name string
		args string
		want []string // substrings of stdout
	}{
		{"L4 frontend to reviews is denied: the GET rule is dropped",
			"--from bookinfo/frontend --to bookinfo/reviews-v1 --port 9080",
			[]string{"decision:  DENY", "reason:    no ALLOW policy matched", "to:        bookinfo/reviews-v1 {app=reviews,version=v1} port 9080 (10.1.0.7)", "found: methods"}},
		{"HTTP GET frontend to reviews is allowed",
			"--from spiffe://cluster.local/ns/bookinfo/sa/frontend --to bookinfo/reviews-v1 --port 9080 --method GET --path /",
			[]string{"decision:  ALLOW", "allowed by AuthorizationPolicy bookinfo/allow-frontend-to-reviews (ALLOW)", "<- decided"}},
		{"HTTP GET frontend to ratings is denied",
			"--from bookinfo/frontend --to bookinfo --to-labels app=ratings --port 9080 --method GET",
			[]string{"decision:  DENY", "no ALLOW policy matched"}},
		{"plaintext refused under namespace STRICT",
			"--to bookinfo/reviews-v1 --port 9080",
			[]string{"decision:  DENY", "no peer identity (plaintext) and mTLS is STRICT", "mTLS:      STRICT, set by PeerAuthentication bookinfo/default; plaintext refused"}},
		{"other namespace has no policies",
			"--from none --to legacy --port 80",
			[]string{"decision:  ALLOW", "no ALLOW policy applies", "PERMISSIVE, the default", "(none)"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			args := append([]string{"policy", "check", "-f", "testdata"}, strings.Fields(tc.args)...)
			if err := run(context.Background(), args, &out, &errOut); err != nil {
				t.Fatalf("run: %v\n%s", err, errOut.String())
			}
			for _, w := range tc.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("stdout lacks %q:\n%s", w, out.String())
				}
			}
			if !strings.Contains(errOut.String(), `rejected: testdata/broken.yaml:1: AuthorizationPolicy bookinfo/broken: spec.rules: a DENY policy must have rules`) {
				t.Errorf("stderr lacks the rejected object:\n%s", errOut.String())
			}
		})
	}
}

func TestPolicyCheckUsageErrors(t *testing.T) {
	for _, args := range []string{
		"policy check -f testdata --to bookinfo/x",                        // no port
		"policy check -f testdata --to bookinfo/x --port 80 --from a/b/c", // bad identity
		"policy check -f missing-dir --to bookinfo/x --port 80",
		"policy check -f testdata --to bookinfo/x --port 80 --request-principal nosub",
		"nonsense",
	} {
		var out, errOut bytes.Buffer
		if err := run(context.Background(), strings.Fields(args), &out, &errOut); err == nil {
			t.Errorf("%q: want an error", args)
		}
	}
	var out bytes.Buffer
	if err := run(context.Background(), []string{"policy", "check", "-h"}, &out, &out); err == nil || !strings.Contains(out.String(), "--from ID") {
		t.Errorf("-h: %v\n%s", err, out.String())
	}
}
