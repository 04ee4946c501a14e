//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// nftTable is the nftables table (family inet) veil owns.
const nftTable = "veil"

type nodeRouting struct {
	table, priority int
	mark, mask      uint32
}

func families() []int {
	fams := []int{netlink.FAMILY_V4}
	// A node booted with ipv6.disable=1 has no IPv6 routing to set up.
	if _, err := os.Stat("/proc/sys/net/ipv6"); err == nil {
		fams = append(fams, netlink.FAMILY_V6)
	}
	return fams
}

func (r nodeRouting) rule(family int) *netlink.Rule {
	rule := netlink.NewRule()
	rule.Family = family
	rule.Mark = r.mark
	mask := r.mask
	rule.Mask = &mask
	rule.Table = r.table
	rule.Priority = r.priority
	return rule
}

func (r nodeRouting) route(family int, lo int) *netlink.Route {
	dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	if family == netlink.FAMILY_V6 {
		dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &netlink.Route{
		Family: family, Table: r.table, Type: unix.RTN_LOCAL, Scope: unix.RT_SCOPE_HOST,
		Dst: dst, LinkIndex: lo,
	}
}

// findRules lists rules identical to veil's (same mark, mask, table and priority).
func (r nodeRouting) findRules(family int) ([]netlink.Rule, error) {
	want := r.rule(family)
	rules, err := netlink.RuleListFiltered(family, want, netlink.RT_FILTER_MARK|netlink.RT_FILTER_MASK|netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PRIORITY)
	if err != nil {
		return nil, err
	}
	return rules, nil
}

// setupNode installs, idempotently, what turns assigned packets into local deliveries:
//
//	ip rule add fwmark MARK/MASK lookup TABLE priority PRIO        (v4 and v6)
//	ip route add local default dev lo table TABLE                  (v4 and v6)
//	nft: table inet veil { chain prerouting { type filter hook prerouting priority raw;
//	                       meta mark & MASK == MARK notrack } }
//
// Without the route an assigned packet to a remote original destination is forwarded,
// and forwarding drops packets that carry a socket. Without NOTRACK, kube-proxy's DNAT
// would rewrite a captured connection to a ClusterIP before the agent sees it.
func setupNode(o Options) error {
	r := nodeRouting{table: o.RouteTable, priority: o.RulePriority, mark: o.CaptureMark, mask: o.MarkMask}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("bpf: node setup: loopback: %w", err)
	}
	if lo.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(lo); err != nil {
			return fmt.Errorf("bpf: node setup: set lo up: %w", err)
		}
	}
	for _, fam := range families() {
		rules, err := r.findRules(fam)
		if err != nil {
			return fmt.Errorf("bpf: node setup: list %s rules: %w", famName(fam), err)
		}
		if len(rules) == 0 {
			if err := netlink.RuleAdd(r.rule(fam)); err != nil {
				return fmt.Errorf("bpf: node setup: add %s rule fwmark %#x/%#x table %d: %w", famName(fam), r.mark, r.mask, r.table, err)
			}
		}
		if err := netlink.RouteReplace(r.route(fam, lo.Attrs().Index)); err != nil {
			return fmt.Errorf("bpf: node setup: add %s local default route in table %d: %w", famName(fam), r.table, err)
		}
	}
	if o.SkipNotrack {
		return nil
	}
	if err := installNotrack(o.CaptureMark, o.MarkMask); err != nil {
		return fmt.Errorf("bpf: node setup: nftables NOTRACK rule (needs CONFIG_NF_TABLES, Linux 3.13, or set SkipNotrack where no netfilter NAT runs): %w", err)
	}
	return nil
}

func famName(fam int) string {
	if fam == netlink.FAMILY_V6 {
		return "IPv6"
	}
	return "IPv4"
}

// installNotrack replaces table inet veil atomically: add (no-op if present), delete, and
// re-create in one batch, so re-running Load leaves exactly one rule.
func installNotrack(mark, mask uint32) error {
	conn, err := nftables.New()
	if err != nil {
		return err
	}
	defer conn.CloseLasting()
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: nftTable}
	conn.AddTable(t)
	conn.DelTable(t)
	t = conn.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: nftTable})
	ch := conn.AddChain(&nftables.Chain{
		Name: "prerouting", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRaw,
	})
	conn.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(mask), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)},
		&expr.Notrack{},
	}})
	return conn.Flush()
}

func removeNotrack() error {
	conn, err := nftables.New()
	if err != nil {
		return err
	}
	defer conn.CloseLasting()
	tables, err := conn.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		// No nf_tables in this kernel: nothing of ours can be there.
		if errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		return err
	}
	for _, t := range tables {
		if t.Name == nftTable {
			conn.DelTable(t)
			return conn.Flush()
		}
	}
	return nil
}

// teardownNode removes the rules, routes and nftables table setupNode installed.
func teardownNode(r nodeRouting) error {
	var errs []error
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("bpf: uninstall: loopback: %w", err)
	}
	for _, fam := range families() {
		rules, err := r.findRules(fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("bpf: uninstall: list %s rules: %w", famName(fam), err))
		}
		for i := range rules {
			if err := netlink.RuleDel(&rules[i]); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("bpf: uninstall: delete %s rule: %w", famName(fam), err))
			}
		}
		if err := netlink.RouteDel(r.route(fam, lo.Attrs().Index)); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("bpf: uninstall: delete %s route in table %d: %w", famName(fam), r.table, err))
		}
	}
	if err := removeNotrack(); err != nil {
		errs = append(errs, fmt.Errorf("bpf: uninstall: nftables table inet %s: %w", nftTable, err))
	}
	return errors.Join(errs...)
}
