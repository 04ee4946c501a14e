//go:build linux

package bpf

import (
	"encoding/binary"
	"net/netip"
)

// Packet builders for BPF_PROG_TEST_RUN. Checksums are left zero: the programs do not
// read them and the test run does not verify them.

const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

func ethHdr(proto uint16) []byte {
	b := make([]byte, 14)
	copy(b, []byte{0x02, 0, 0, 0, 0, 1})
	copy(b[6:], []byte{0x02, 0, 0, 0, 0, 2})
	binary.BigEndian.PutUint16(b[12:], proto)
	return b
}

func tcpHdr(sport, dport uint16, flags byte) []byte {
	b := make([]byte, 20)
	binary.BigEndian.PutUint16(b, sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	b[12] = 5 << 4
	b[13] = flags
	return b
}

func udpHdr(sport, dport uint16) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint16(b, sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint16(b[4:], 8)
	return b
}

type v4opts struct {
	options []byte // IP options, padded by the caller to a multiple of 4
	frag    uint16 // flags+offset field, e.g. 0x2000 (MF)
	ihl     int    // override (0: computed)
}

func ipv4Pkt(src, dst netip.Addr, proto byte, o v4opts, payload []byte) []byte {
	hl := 20 + len(o.options)
	ip := make([]byte, hl)
	ihl := hl / 4
	if o.ihl != 0 {
		ihl = o.ihl
	}
	ip[0] = 4<<4 | byte(ihl)
	binary.BigEndian.PutUint16(ip[2:], uint16(hl+len(payload)))
	binary.BigEndian.PutUint16(ip[6:], o.frag)
	ip[8] = 64
	ip[9] = proto
	s, d := src.As4(), dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	copy(ip[20:], o.options)
	pkt := append(ethHdr(0x0800), ip...)
	return append(pkt, payload...)
}

// extHdr is one IPv6 extension header: its type and its body after the 2-byte
// next-header/length prefix (fragment headers use all 8 bytes as given).
type extHdr struct {
	typ  byte
	body []byte
}

func ipv6Pkt(src, dst netip.Addr, proto byte, exts []extHdr, payload []byte) []byte {
	var chain []byte
	next := proto
	for i := len(exts) - 1; i >= 0; i-- {
		e := exts[i]
		var h []byte
		switch e.typ {
		case 44: // fragment: fixed 8 bytes
			h = make([]byte, 8)
			copy(h[2:], e.body)
			h[0] = next
		case 51: // AH: length in 4-octet units minus 2
			h = append([]byte{next, byte((2+len(e.body))/4 - 2)}, e.body...)
		default: // hop-by-hop, routing, destination options: 8-octet units minus 1
			h = append([]byte{next, byte((2+len(e.body))/8 - 1)}, e.body...)
		}
		chain = append(h, chain...)
		next = e.typ
	}
	ip := make([]byte, 40)
	ip[0] = 6 << 4
	binary.BigEndian.PutUint16(ip[4:], uint16(len(chain)+len(payload)))
	ip[6] = next
	ip[7] = 64
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	pkt := append(ethHdr(0x86dd), ip...)
	pkt = append(pkt, chain...)
	return append(pkt, payload...)
}

// skBuff mirrors struct __sk_buff (linux/bpf.h) for the test run's context in and out.
type skBuff struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto uint32
	Priority, IngressIfindex, Ifindex, TCIndex                                  uint32
	CB                                                                          [5]uint32
	Hash, TCClassid, Data, DataEnd, NapiID, Family, RemoteIP4, LocalIP4         uint32
	RemoteIP6, LocalIP6                                                         [4]uint32
	RemotePort, LocalPort, DataMeta                                             uint32
	FlowKeys, Tstamp                                                            uint64
	WireLen, GSOSegs                                                            uint32
	Sk                                                                          uint64
	GSOSize                                                                     uint32
	TstampType                                                                  uint32
	Hwtstamp                                                                    uint64
}
