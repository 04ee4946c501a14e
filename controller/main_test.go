package controller

import (
	"testing"

	"go.uber.org/goleak"
)

// The config server owns long-lived streams: every test must end them all.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
