package kafka

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

// MissingTopics asks the brokers of cfg about topics, in one metadata request that creates
// nothing (whatever cfg.AutoCreateTopics says), and returns, sorted, those that do not exist.
// ctx bounds it.
func MissingTopics(ctx context.Context, cfg Config, topics []string) ([]string, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if len(topics) == 0 {
		return nil, nil
	}
	opts, err := cfg.clientOpts()
	if err != nil {
		return nil, err
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("new kafka client: %w", err)
	}
	defer cl.Close()
	md, err := kadm.NewClient(cl).Metadata(ctx, topics...)
	if err != nil {
		return nil, fmt.Errorf("kafka metadata of %d topics: %w", len(topics), err)
	}
	var missing []string
	for _, t := range topics {
		if d, ok := md.Topics[t]; ok && errors.Is(d.Err, kerr.UnknownTopicOrPartition) {
			missing = append(missing, t)
		}
	}
	slices.Sort(missing)
	return missing, nil
}
