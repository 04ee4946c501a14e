//go:build ignore

// capture.c: TC programs that hand enrolled pods' TCP connections to the veil agent.
//
// veil_ingress runs at TC ingress of every interface where packets enter the node's IP
// stack (every pod's host-side veth, enrolled or not, and every uplink). It decides per
// packet, from the enrollment map, whether the packet belongs to the agent and, if so,
// bpf_sk_assign()s it to the agent's socket and sets the capture mark, which a policy route
// (ip rule fwmark -> table with "local default dev lo") turns into local delivery.
//
// veil_egress runs at TC egress of pod veths. It only acts when host capture is enabled:
// host-originated connections to an enrolled pod are hairpinned back into the veth's ingress
// so veil_ingress can assign them.
//
// The programs never change per pod; enrollment is a map update.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char __license[] SEC("license") = "Dual BSD/GPL";

// TC_ACT_UNSPEC is TCX_NEXT under TCX and "continue" for a direct-action cls_bpf filter:
// packets veil does not own are left to whatever else is attached (a CNI's programs).
#define VEIL_NEXT TC_ACT_UNSPEC

// Listener roles: index into the listeners SOCKMAP is role*2 + (IPv6 ? 1 : 0).
enum role {
	ROLE_OUTBOUND = 0,	// :15001
	ROLE_INBOUND = 1,	// :15006, plaintext to an enrolled pod
	ROLE_INBOUND_HBONE = 2, // :15008, HBONE to an enrolled pod
	ROLE_MAX = 3,
};

// Decisions. Each is also a counter index and is written to skb->cb[0] so that
// BPF_PROG_TEST_RUN tests can see what was decided even where the kernel refuses the
// action itself (bpf_sk_assign needs a real TC ingress).
enum decision {
	D_NONE = 0,
	D_PASS_NOT_IP = 1,
	D_PASS_NOT_TCP = 2,
	D_PASS_NOT_ENROLLED = 3,
	D_PASS_MARKED = 4,
	D_PASS_EXCLUDED = 5,
	D_PASS_MALFORMED = 6, // addresses unreadable: nobody's packet, the IP stack drops it
	D_ESTABLISHED = 7,    // to an existing socket for the 4-tuple
	D_OUTBOUND = 8,
	D_INBOUND = 9,
	D_INBOUND_HBONE = 10,
	D_DROP_MALFORMED = 11,
	D_DROP_FRAGMENT = 12,
	D_DROP_NO_SOCKET = 13,	 // not a SYN and no socket: would leak a stale flow
	D_DROP_NO_LISTENER = 14, // agent gone: fail closed
	D_FAIL_OPEN = 15,	 // agent gone, fail-open configured
	D_HOST_HAIRPIN = 16,	 // egress: host-originated, sent back into ingress
	D_PASS_HOST = 17,	 // egress: host-originated, not captured
	D_ASSIGN_FAILED = 18,	 // counter only
	D_MAX = 19,
};

#define CFG_FAIL_OPEN (1 << 0)
#define CFG_CAPTURE_HOST (1 << 1)

struct config {
	__u32 capture_mark; // set on assigned packets; the policy route matches it
	__u32 agent_mark;   // SO_MARK of the agent's sockets; never captured
	__u32 mark_mask;
	__u32 flags;
	// Not read by the programs: the policy routing Load installed, kept here so that
	// uninstall can remove it knowing only the pin directory.
	__u32 route_table;
	__u32 rule_priority;
};

// Addresses are stored IPv4-mapped (::ffff:a.b.c.d) so one map serves both families.
struct addr {
	__u8 b[16];
};

struct endpoint {
	__u32 ifindex; // host-side veth of the pod; a source address only counts from here
	__u32 flags;
};

struct lpm_key {
	__u32 prefixlen;
	struct addr a;
};

struct iface_state {
	__u32 flags;	   // how programs are attached (user space bookkeeping)
	__s32 rp_filter;   // sysctl values before veil changed them, restored on uninstall
	__s32 accept_local;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct addr);
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_enrolled SEC(".maps");

// Pod veths that are ports of a Linux bridge (flannel's cni0, the bridge plugin): frames
// between pods of one bridge are switched, never routed, so an assigned packet would be
// switched to the destination pod and dropped there (it carries a socket). Instead it is
// readdressed to the bridge device and redirected into the bridge's ingress, where the IP
// stack delivers it to the assigned socket.
struct port_mac {
	__u8 mac[6]; // the bridge's address
	__u16 pad;
	__u32 bridge; // the bridge's ifindex
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct port_mac);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_port_mac SEC(".maps");

// Destinations an enrolled pod reaches directly (operator-configured CIDRs).
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_exclude SEC(".maps");

// Host sources never captured even with host capture on (kubelet probes).
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_host_exclude SEC(".maps");

// The agent's listening sockets. A SOCKMAP, not a lookup by port: only sockets the agent
// registered get traffic (a hostNetwork process binding :15001 cannot), and the kernel
// removes a socket when it closes, so a dead agent means an empty slot and fail-closed.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, ROLE_MAX * 2);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, D_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_counters SEC(".maps");

// Interfaces veil attached to, and what it changed there. Read only by user space; a map
// rather than a file because it must live exactly as long as the other pins.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct iface_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} veil_ifaces SEC(".maps");

enum parse_result {
	P_TCP = 0,
	P_NOT_IP,
	P_BAD_L3, // addresses unknown
	P_NOT_TCP,
	P_FRAGMENT, // TCP, but this packet has no usable TCP header
	P_BAD_L4,   // TCP header truncated or the extension header chain too long
};

struct flow {
	struct addr saddr;
	struct addr daddr;
	__be16 sport;
	__be16 dport;
	__u8 v6;
	__u8 syn; // SYN without ACK: a new connection
};

// IPv6 extension headers walked before giving up. Real stacks send at most a few; a chain
// longer than this from or to an enrolled pod is dropped rather than passed unseen.
#define MAX_EXT_HDRS 8

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&veil_counters, &idx);
	if (v)
		*v += 1;
}

static __always_inline int decide(struct __sk_buff *skb, __u32 d, int action)
{
	skb->cb[0] = d;
	count(d);
	return action;
}

static __always_inline void map_v4(struct addr *a, __be32 ip)
{
	__builtin_memset(a, 0, sizeof(*a));
	a->b[10] = 0xff;
	a->b[11] = 0xff;
	__builtin_memcpy(&a->b[12], &ip, 4);
}

static __always_inline int parse_tcp(struct __sk_buff *skb, __u32 off, struct flow *f)
{
	struct tcphdr th;

	if (bpf_skb_load_bytes(skb, off, &th, sizeof(th)))
		return P_BAD_L4;
	if (th.doff < 5)
		return P_BAD_L4;
	f->sport = th.source;
	f->dport = th.dest;
	f->syn = th.syn && !th.ack;
	return P_TCP;
}

static __always_inline int parse_v4(struct __sk_buff *skb, __u32 off, struct flow *f)
{
	struct iphdr iph;

	if (bpf_skb_load_bytes(skb, off, &iph, sizeof(iph)))
		return P_BAD_L3;
	if (iph.version != 4 || iph.ihl < 5)
		return P_BAD_L3;
	map_v4(&f->saddr, iph.saddr);
	map_v4(&f->daddr, iph.daddr);
	if (iph.protocol != IPPROTO_TCP)
		return P_NOT_TCP;
	// Any fragment, first included: the kernel reassembles after routing, so an assigned
	// first fragment and unassigned later ones would part ways. TCP sets DF; this is rare.
	if (iph.frag_off & bpf_htons(0x3fff))
		return P_FRAGMENT;
	// ihl counts IPv4 options: the TCP header starts after them, not at a fixed 20.
	return parse_tcp(skb, off + iph.ihl * 4, f);
}

struct ext_hdr {
	__u8 nexthdr;
	__u8 len;
	__be16 frag_off; // fragment header only
};

static __always_inline int parse_v6(struct __sk_buff *skb, __u32 off, struct flow *f)
{
	struct ipv6hdr ip6;

	if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)))
		return P_BAD_L3;
	if (ip6.version != 6)
		return P_BAD_L3;
	__builtin_memcpy(&f->saddr, &ip6.saddr, 16);
	__builtin_memcpy(&f->daddr, &ip6.daddr, 16);
	f->v6 = 1;

	__u8 next = ip6.nexthdr;
	off += sizeof(ip6);

#pragma unroll
	for (int i = 0; i < MAX_EXT_HDRS; i++) {
		struct ext_hdr h;

		switch (next) {
		case IPPROTO_TCP:
			return parse_tcp(skb, off, f);
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if (bpf_skb_load_bytes(skb, off, &h, 2))
				return P_BAD_L4;
			next = h.nexthdr;
			off += (h.len + 1) * 8; // RFC 8200 4.3: length in 8-octet units, not counting the first 8
			break;
		case IPPROTO_AH:
			if (bpf_skb_load_bytes(skb, off, &h, 2))
				return P_BAD_L4;
			next = h.nexthdr;
			off += (h.len + 2) * 4; // RFC 4302 2.2: 4-octet units minus 2
			break;
		case IPPROTO_FRAGMENT:
			if (bpf_skb_load_bytes(skb, off, &h, 4))
				return P_BAD_L4;
			// Offset or more-fragments set: a real fragment. Offset 0 with M=0 is an
			// atomic fragment (RFC 6946) and carries the whole TCP segment.
			if (h.frag_off & bpf_htons(0xfff9)) {
				switch (h.nexthdr) {
				case IPPROTO_TCP:
				/* Extension headers inside the fragmentable part may lead to TCP: a
				 * fragment that cannot be proven not to be TCP is one. */
				case IPPROTO_HOPOPTS:
				case IPPROTO_ROUTING:
				case IPPROTO_DSTOPTS:
				case IPPROTO_AH:
					return P_FRAGMENT;
				}
				return P_NOT_TCP;
			}
			next = h.nexthdr;
			off += 8;
			break;
		default:
			return P_NOT_TCP; // ESP, ICMPv6, UDP, no-next-header, ...
		}
	}
	if (next == IPPROTO_TCP)
		return parse_tcp(skb, off, f);
	return P_BAD_L4;
}

static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	// skb->protocol, not the Ethernet header: with VLAN offload it is the inner protocol.
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return parse_v4(skb, ETH_HLEN, f);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return parse_v6(skb, ETH_HLEN, f);
	return P_NOT_IP;
}

static __always_inline struct config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&veil_config, &zero);
}

static __always_inline int lpm_match(void *map, struct addr *a, int v6)
{
	struct lpm_key k = {.prefixlen = 128};
	k.a = *a;
	return bpf_map_lookup_elem(map, &k) != NULL;
}

// Finds a socket that already owns this 4-tuple: an agent connection (accepted, or dialled
// with a transparent source), a request socket mid-handshake, or a host socket whose flow
// was never captured. LISTEN is skipped (a new connection goes to the agent's listener, not
// to whatever listens on the original port) and so is TIME_WAIT (a SYN reusing the tuple
// is a new connection).
static __always_inline struct bpf_sock *lookup_established(struct __sk_buff *skb, struct flow *f)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 len;

	if (f->v6) {
		__builtin_memcpy(t.ipv6.saddr, &f->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, &f->daddr, 16);
		t.ipv6.sport = f->sport;
		t.ipv6.dport = f->dport;
		len = sizeof(t.ipv6);
	} else {
		__builtin_memcpy(&t.ipv4.saddr, &f->saddr.b[12], 4);
		__builtin_memcpy(&t.ipv4.daddr, &f->daddr.b[12], 4);
		t.ipv4.sport = f->sport;
		t.ipv4.dport = f->dport;
		len = sizeof(t.ipv4);
	}
	sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return NULL;
	if (sk->state == BPF_TCP_LISTEN || sk->state == BPF_TCP_TIME_WAIT) {
		bpf_sk_release(sk);
		return NULL;
	}
	return sk;
}

// Assigns and always releases sk: the lookup took a reference whatever happens next.
static __always_inline int assign(struct __sk_buff *skb, struct bpf_sock *sk, struct config *cfg,
				  __u32 d)
{
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	skb->cb[0] = d;
	if (err) {
		// Fail closed: an unassigned packet would be forwarded in plaintext.
		skb->cb[1] = (__u32)-err;
		count(D_ASSIGN_FAILED);
		return TC_ACT_SHOT;
	}
	// A hairpinned host packet still carries the pod's MAC and arrives as OTHERHOST,
	// which ip_rcv drops.
	if (skb->pkt_type != PACKET_HOST)
		bpf_skb_change_type(skb, PACKET_HOST);
	skb->mark = (skb->mark & ~cfg->mark_mask) | cfg->capture_mark;
	count(d);
	// On a bridge port: into the bridge's own ingress, addressed to the bridge.
	__u32 ifindex = skb->ifindex;
	struct port_mac *pm = bpf_map_lookup_elem(&veil_port_mac, &ifindex);
	if (pm) {
		if (bpf_skb_store_bytes(skb, 0, pm->mac, ETH_ALEN, 0)) {
			skb->cb[1] = 1;
			count(D_ASSIGN_FAILED);
			return TC_ACT_SHOT;
		}
		return bpf_redirect(pm->bridge, BPF_F_INGRESS);
	}
	return TC_ACT_OK;
}

static __always_inline int marked(struct __sk_buff *skb, struct config *cfg)
{
	return cfg->agent_mark && (skb->mark & cfg->mark_mask) == cfg->agent_mark;
}

SEC("tc")
int veil_ingress(struct __sk_buff *skb)
{
	struct config *cfg = get_config();
	struct flow f = {};
	struct endpoint *ep;
	struct bpf_sock *sk;
	int from_pod = 0;
	__u32 key, d;

	skb->cb[0] = D_NONE;
	skb->cb[1] = 0;
	if (!cfg)
		return VEIL_NEXT;

	int p = parse(skb, &f);
	if (p == P_NOT_IP)
		return decide(skb, D_PASS_NOT_IP, VEIL_NEXT);
	if (p == P_BAD_L3)
		return decide(skb, D_PASS_MALFORMED, VEIL_NEXT);
	if (p == P_NOT_TCP)
		return decide(skb, D_PASS_NOT_TCP, VEIL_NEXT);
	if (marked(skb, cfg))
		return decide(skb, D_PASS_MARKED, VEIL_NEXT);

	// A source address counts as an enrolled pod only on that pod's own veth, so a
	// packet spoofing an enrolled pod's address elsewhere is judged by its destination.
	ep = bpf_map_lookup_elem(&veil_enrolled, &f.saddr);
	if (ep && ep->ifindex == skb->ifindex)
		from_pod = 1;
	else if (!bpf_map_lookup_elem(&veil_enrolled, &f.daddr))
		return decide(skb, D_PASS_NOT_ENROLLED, VEIL_NEXT);

	if (p == P_FRAGMENT)
		return decide(skb, D_DROP_FRAGMENT, TC_ACT_SHOT);
	if (p == P_BAD_L4)
		return decide(skb, D_DROP_MALFORMED, TC_ACT_SHOT);

	/* An excluded destination is reached directly, and so are its answers: a packet of
	 * an existing connection (not a new SYN) from an excluded address to a pod. A new
	 * connection from an excluded address to a pod is still captured. */
	if (from_pod && lpm_match(&veil_exclude, &f.daddr, f.v6))
		return decide(skb, D_PASS_EXCLUDED, VEIL_NEXT);
	if (!from_pod && !f.syn && lpm_match(&veil_exclude, &f.saddr, f.v6))
		return decide(skb, D_PASS_EXCLUDED, VEIL_NEXT);

	sk = lookup_established(skb, &f);
	if (sk)
		return assign(skb, sk, cfg, D_ESTABLISHED);

	if (!f.syn) {
		// Mid-flow without a socket: the agent connection died (agent restart) or the
		// flow predates enrollment. Passing it would send its bytes around the agent.
		if (cfg->flags & CFG_FAIL_OPEN)
			return decide(skb, D_FAIL_OPEN, VEIL_NEXT);
		return decide(skb, D_DROP_NO_SOCKET, TC_ACT_SHOT);
	}

	if (from_pod) {
		key = ROLE_OUTBOUND;
		d = D_OUTBOUND;
	} else if (f.dport == bpf_htons(15008)) {
		key = ROLE_INBOUND_HBONE;
		d = D_INBOUND_HBONE;
	} else {
		key = ROLE_INBOUND;
		d = D_INBOUND;
	}
	key = key * 2 + f.v6;
	sk = bpf_map_lookup_elem(&veil_listeners, &key);
	if (!sk) {
		skb->cb[1] = d;
		if (cfg->flags & CFG_FAIL_OPEN)
			return decide(skb, D_FAIL_OPEN, VEIL_NEXT);
		return decide(skb, D_DROP_NO_LISTENER, TC_ACT_SHOT);
	}
	return assign(skb, sk, cfg, d);
}

SEC("tc")
int veil_egress(struct __sk_buff *skb)
{
	struct config *cfg = get_config();
	struct flow f = {};
	struct endpoint *ep;
	struct bpf_sock *sk;

	skb->cb[0] = D_NONE;
	skb->cb[1] = 0;
	// Without host capture this program is a no-op; it stays attached so that turning the
	// flag on is a map update.
	if (!cfg || !(cfg->flags & CFG_CAPTURE_HOST))
		return VEIL_NEXT;

	int p = parse(skb, &f);
	if (p == P_NOT_IP)
		return decide(skb, D_PASS_NOT_IP, VEIL_NEXT);
	if (p == P_BAD_L3)
		return decide(skb, D_PASS_MALFORMED, VEIL_NEXT);
	if (p == P_NOT_TCP)
		return decide(skb, D_PASS_NOT_TCP, VEIL_NEXT);
	if (marked(skb, cfg))
		return decide(skb, D_PASS_MARKED, VEIL_NEXT);
	// Forwarded packets carry no socket; they were judged at their ingress. Only the host's
	// own sockets (kubelet, hostNetwork pods) are left for this program.
	if (!skb->sk)
		return decide(skb, D_PASS_NOT_ENROLLED, VEIL_NEXT);

	ep = bpf_map_lookup_elem(&veil_enrolled, &f.daddr);
	if (!ep || ep->ifindex != skb->ifindex)
		return decide(skb, D_PASS_NOT_ENROLLED, VEIL_NEXT);
	if (lpm_match(&veil_host_exclude, &f.saddr, f.v6))
		return decide(skb, D_PASS_EXCLUDED, VEIL_NEXT);
	if (p == P_FRAGMENT)
		return decide(skb, D_DROP_FRAGMENT, TC_ACT_SHOT);
	if (p == P_BAD_L4)
		return decide(skb, D_DROP_MALFORMED, TC_ACT_SHOT);

	// New connections, and packets of connections the agent already holds (its accepted
	// socket has the pod's address as local address), go back into ingress where
	// veil_ingress assigns them. Anything else is a host flow that was never captured
	// (one that existed before enrollment, or a reply to a pod's connection to the host).
	if (!f.syn) {
		sk = lookup_established(skb, &f);
		if (!sk)
			return decide(skb, D_PASS_HOST, VEIL_NEXT);
		bpf_sk_release(sk);
	}
	skb->cb[0] = D_HOST_HAIRPIN;
	count(D_HOST_HAIRPIN);
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}
