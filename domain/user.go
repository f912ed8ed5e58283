package domain

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/mail"
	"strings"
	"time"
)

// ErrInvalidUser is returned by NewUser when the name or the email is not acceptable.
var ErrInvalidUser = errors.New("invalid user")

// UserAggregateType is the aggregate type of users' events.
const UserAggregateType = "user"

// User is the example aggregate: a person with a name and an email address.
type User struct {
	id    string
	name  string
	email string
}

// NewUser validates name and email and returns a new user with a fresh id.
func NewUser(name, email string) (User, error) {
	name = strings.TrimSpace(name)
	if name == "" {
		return User{}, fmt.Errorf("%w: name is empty", ErrInvalidUser)
	}
	addr, err := mail.ParseAddress(email)
	if err != nil || addr.Address != email {
		return User{}, fmt.Errorf("%w: email %q is not an address", ErrInvalidUser, email)
	}
	return User{id: NewID(), name: name, email: email}, nil
}

// ID returns the user's id.
func (u User) ID() string { return u.id }

// Name returns the user's name.
func (u User) Name() string { return u.name }

// Email returns the user's email address.
func (u User) Email() string { return u.email }

// UserCreated is the fact that a user was created. It carries the id and the email only.
type UserCreated struct {
	userID     string
	email      string
	occurredAt time.Time
}

// NewUserCreated returns the UserCreated event of user u at time at.
func NewUserCreated(u User, at time.Time) UserCreated {
	return UserCreated{userID: u.id, email: u.email, occurredAt: at.UTC()}
}

// UserID returns the id of the created user.
func (e UserCreated) UserID() string { return e.userID }

// Email returns the email address of the created user.
func (e UserCreated) Email() string { return e.email }

// EventType implements Event.
func (e UserCreated) EventType() string { return "UserCreated" }

// AggregateType implements Event.
func (e UserCreated) AggregateType() string { return UserAggregateType }

// AggregateID implements Event.
func (e UserCreated) AggregateID() string { return e.userID }

// OccurredAt implements Event.
func (e UserCreated) OccurredAt() time.Time { return e.occurredAt }

// userCreatedWire is the JSON form of UserCreated.
type userCreatedWire struct {
	UserID     string    `json:"user_id"`
	Email      string    `json:"email"`
	OccurredAt time.Time `json:"occurred_at"`
}

// MarshalJSON implements Event.
func (e UserCreated) MarshalJSON() ([]byte, error) {
	return json.Marshal(userCreatedWire{UserID: e.userID, Email: e.email, OccurredAt: e.occurredAt})
}

// UnmarshalUserCreated decodes the payload written by UserCreated.MarshalJSON.
func UnmarshalUserCreated(payload []byte) (UserCreated, error) {
	var w userCreatedWire
	if err := json.Unmarshal(payload, &w); err != nil {
		return UserCreated{}, fmt.Errorf("decode UserCreated: %w", err)
	}
	if w.UserID == "" {
		return UserCreated{}, errors.New("decode UserCreated: user_id is empty")
	}
	return UserCreated{userID: w.UserID, email: w.Email, occurredAt: w.OccurredAt}, nil
}
