package main

import (
	"context"
	"encoding/binary"
	"fmt"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"github.com/twmb/franz-go/pkg/kversion"
)

// logCount is what the broker's logs of some topics hold: data records, and control records
// (the transaction markers: one per partition a Kafka transaction wrote to, at its commit or
// abort).
type logCount struct {
	Data, Markers int64
}

// countLog reads every partition of topics from the broker at addrs, from offset 0 up to its end
// offset (the high watermark), and counts the records of its data batches and of its control
// batches. The markers are counted from the broker's log itself, not estimated: the end offset
// minus the data records is the control records, and a control batch says it is one (attribute
// bit 5). Fetch requests of version 12 at most (topics by name), read_uncommitted, so the
// records of aborted transactions count as data.
func countLog(ctx context.Context, addrs []string, topics ...string) (logCount, error) {
	var n logCount
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.MaxVersions(kversion.V3_0_0()))
	if err != nil {
		return n, err
	}
	defer cl.Close()
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, topics...)
	if err != nil {
		return n, fmt.Errorf("end offsets: %w", err)
	}
	if err := ends.Error(); err != nil {
		return n, fmt.Errorf("end offsets: %w", err)
	}
	var all []kadm.ListedOffset
	ends.Each(func(o kadm.ListedOffset) { all = append(all, o) })
	var total int64
	for _, o := range all {
		total += o.Offset
		for off := int64(0); off < o.Offset; {
			next, got, err := fetchCount(ctx, cl, o.Topic, o.Partition, off)
			if err != nil {
				return n, fmt.Errorf("read %s[%d] at %d: %w", o.Topic, o.Partition, off, err)
			}
			if next <= off {
				return n, fmt.Errorf("read %s[%d] at %d: no progress (end offset %d)", o.Topic, o.Partition, off, o.Offset)
			}
			n.Data += got.Data
			n.Markers += got.Markers
			off = next
		}
	}
	if n.Data+n.Markers != total {
		return n, fmt.Errorf("%d data and %d control records, but end offsets add up to %d", n.Data, n.Markers, total)
	}
	return n, nil
}

// fetchCount fetches partition p of topic from offset off and counts the records of the batches
// returned; next is the offset after the last one.
func fetchCount(ctx context.Context, cl *kgo.Client, topic string, p int32, off int64) (next int64, n logCount, err error) {
	req := kmsg.NewPtrFetchRequest()
	req.Version = 12
	req.ReplicaID = -1
	req.MaxWaitMillis = 100
	req.MaxBytes = 64 << 20
	req.IsolationLevel = 0
	rt := kmsg.NewFetchRequestTopic()
	rt.Topic = topic
	rp := kmsg.NewFetchRequestTopicPartition()
	rp.Partition = p
	rp.FetchOffset = off
	rp.PartitionMaxBytes = 32 << 20
	rp.CurrentLeaderEpoch = -1
	rp.LogStartOffset = -1
	rt.Partitions = append(rt.Partitions, rp)
	req.Topics = append(req.Topics, rt)
	resp, err := req.RequestWith(ctx, cl)
	if err != nil {
		return off, n, err
	}
	if len(resp.Topics) != 1 || len(resp.Topics[0].Partitions) != 1 {
		return off, n, fmt.Errorf("unexpected fetch response shape")
	}
	rp0 := resp.Topics[0].Partitions[0]
	if rp0.ErrorCode != 0 {
		return off, n, fmt.Errorf("fetch: error code %d", rp0.ErrorCode)
	}
	next = off
	for raw := rp0.RecordBatches; len(raw) >= 12; {
		size := 12 + int(int32(binary.BigEndian.Uint32(raw[8:12])))
		if size > len(raw) {
			break // a partial batch at the end of the response
		}
		var b kmsg.RecordBatch
		if err := b.ReadFrom(raw[:size]); err != nil {
			return off, n, err
		}
		raw = raw[size:]
		end := b.FirstOffset + int64(b.LastOffsetDelta) + 1
		if end <= next {
			continue // a batch before off, whole
		}
		if b.Attributes&0x20 != 0 {
			n.Markers += int64(b.NumRecords)
		} else {
			n.Data += int64(b.NumRecords)
		}
		next = end
	}
	return next, n, nil
}

// progressTopic is the kafka.progress_topic of the exactly-once relay that drains schema.
func progressTopic(schema string) string { return "bench-progress-" + schema }
