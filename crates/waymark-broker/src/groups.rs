//! A single-node group coordinator speaking Kafka's classic group protocol.
//!
//! Group state lives in memory (members, generation, assignments), as in a
//! Kafka coordinator between restarts; committed offsets are written to the
//! embedded log's durable group-offset table before `OffsetCommit` is
//! answered, so they survive a crash. After a restart every group is empty
//! and members rejoin, as they do after a Kafka coordinator moves.
//!
//! A rebalance follows Kafka's: a join (or a leave, or an expired session)
//! moves the group to `PreparingRebalance`; it completes when every member
//! has rejoined or the rebalance timeout passes (members that did not
//! rejoin are removed); the new generation's leader gets the member list
//! and sends the assignment in `SyncGroup`, which completes every member's
//! `SyncGroup`. Members learn of a rebalance from `Heartbeat`
//! (`REBALANCE_IN_PROGRESS`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    DescribeGroupsRequest, DescribeGroupsResponse, GroupId, HeartbeatRequest, HeartbeatResponse,
    JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest,
    ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
    OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use waymark_embedded::EmbeddedLog;

use crate::api::str_bytes;

/// How often sessions and rebalance deadlines are checked.
const SWEEP: Duration = Duration::from_millis(100);
/// How long a member id handed out with `MEMBER_ID_REQUIRED` waits for its
/// join.
const PENDING_MEMBER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

struct Member {
    client_id: String,
    client_host: String,
    protocols: Vec<(String, Bytes)>,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    last_seen: Instant,
    assignment: Bytes,
    /// Waiting for the rebalance in progress to complete.
    join: Option<(oneshot::Sender<JoinGroupResponse>, i16)>,
    /// Waiting for the leader's assignment.
    sync: Option<oneshot::Sender<SyncGroupResponse>>,
}

impl Member {
    fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

struct Group {
    state: State,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Ids handed out with `MEMBER_ID_REQUIRED`, not joined yet.
    pending: HashMap<String, Instant>,
    /// When the rebalance in progress completes at the latest.
    deadline: Option<Instant>,
}

impl Group {
    fn new() -> Self {
        Self {
            state: State::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending: HashMap::new(),
            deadline: None,
        }
    }

    /// Starts a rebalance (or keeps the one in progress).
    fn prepare_rebalance(&mut self, now: Instant) {
        if self.state == State::CompletingRebalance {
            // Members waiting for an assignment of the old generation
            // learn that it is gone.
            for m in self.members.values_mut() {
                if let Some(tx) = m.sync.take() {
                    let _ = tx.send(
                        SyncGroupResponse::default()
                            .with_error_code(ResponseError::RebalanceInProgress.code()),
                    );
                }
            }
        }
        if self.state != State::PreparingRebalance {
            let timeout = self
                .members
                .values()
                .map(|m| m.rebalance_timeout)
                .max()
                .unwrap_or(Duration::ZERO);
            self.deadline = Some(now + timeout);
            self.state = State::PreparingRebalance;
        }
    }

    fn all_joined(&self) -> bool {
        self.members.values().all(|m| m.join.is_some())
    }

    /// Completes the rebalance: drops members that did not rejoin, starts a
    /// new generation and answers every waiting join.
    fn complete_join(&mut self, group_id: &str) {
        self.members.retain(|_, m| m.join.is_some());
        self.deadline = None;
        self.generation += 1;
        if self.members.is_empty() {
            self.state = State::Empty;
            self.protocol = None;
            self.leader = None;
            return;
        }
        // The protocol every member supports, by the members' votes (each
        // votes for its most preferred one among those).
        let common: Vec<String> = {
            let mut sets = self.members.values().map(|m| {
                m.protocols
                    .iter()
                    .map(|(n, _)| n.clone())
                    .collect::<HashSet<_>>()
            });
            let first = sets.next().unwrap_or_default();
            sets.fold(first, |acc, s| acc.intersection(&s).cloned().collect())
                .into_iter()
                .collect()
        };
        let mut votes: BTreeMap<String, usize> = BTreeMap::new();
        for m in self.members.values() {
            if let Some((name, _)) = m.protocols.iter().find(|(n, _)| common.contains(n)) {
                *votes.entry(name.clone()).or_default() += 1;
            }
        }
        let protocol = votes
            .into_iter()
            .max_by_key(|(_, v)| *v)
            .map(|(n, _)| n)
            .unwrap_or_default();
        let leader = match &self.leader {
            Some(l) if self.members.contains_key(l) => l.clone(),
            _ => self.members.keys().next().cloned().unwrap_or_default(),
        };
        self.protocol = Some(protocol.clone());
        self.leader = Some(leader.clone());
        self.state = State::CompletingRebalance;
        let everyone: Vec<JoinGroupResponseMember> = self
            .members
            .iter()
            .map(|(id, m)| {
                JoinGroupResponseMember::default()
                    .with_member_id(str_bytes(id.clone()))
                    .with_metadata(m.metadata(&protocol))
            })
            .collect();
        let protocol_type = self.protocol_type.clone();
        for (id, m) in self.members.iter_mut() {
            m.last_seen = Instant::now();
            if let Some((tx, version)) = m.join.take() {
                let mut r = JoinGroupResponse::default()
                    .with_generation_id(self.generation)
                    .with_protocol_name(Some(str_bytes(protocol.clone())))
                    .with_leader(str_bytes(leader.clone()))
                    .with_member_id(str_bytes(id.clone()));
                if version >= 7 {
                    r = r.with_protocol_type(protocol_type.clone().map(str_bytes));
                }
                if *id == leader {
                    r = r.with_members(everyone.clone());
                }
                let _ = tx.send(r);
            }
        }
        info!(group = group_id, generation = self.generation, members = self.members.len(), %protocol, "group rebalanced");
    }

    fn remove_member(&mut self, id: &str, now: Instant, group_id: &str) {
        if let Some(mut m) = self.members.remove(id) {
            if let Some((tx, _)) = m.join.take() {
                let _ = tx.send(
                    JoinGroupResponse::default()
                        .with_error_code(ResponseError::UnknownMemberId.code())
                        .with_generation_id(-1),
                );
            }
            if self.members.is_empty() {
                self.state = State::Empty;
                self.generation += 1;
                self.protocol = None;
                self.leader = None;
                self.deadline = None;
            } else {
                self.prepare_rebalance(now);
                if self.all_joined() {
                    self.complete_join(group_id);
                }
            }
        }
    }
}

/// A committed offset as answered: `(partition, offset or -1, error code)`.
type Committed = (i32, i64, i16);

/// The coordinator of every group.
pub(crate) struct Coordinator {
    log: EmbeddedLog,
    groups: Mutex<HashMap<String, Group>>,
    session_bounds: (Duration, Duration),
}

fn error_join(e: ResponseError) -> JoinGroupResponse {
    JoinGroupResponse::default()
        .with_error_code(e.code())
        .with_generation_id(-1)
}

impl Coordinator {
    pub(crate) fn new(log: EmbeddedLog, session_bounds: (Duration, Duration)) -> Self {
        Self {
            log,
            groups: Mutex::new(HashMap::new()),
            session_bounds,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        // A panic while holding the lock leaves consistent-enough state
        // (every mutation is a few field writes); keep serving.
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Expires sessions and completes overdue rebalances until cancelled.
    pub(crate) async fn sweep_until(&self, token: CancellationToken) {
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(SWEEP) => {}
            }
            let now = Instant::now();
            let mut groups = self.lock();
            for (id, g) in groups.iter_mut() {
                g.pending
                    .retain(|_, at| now.duration_since(*at) < PENDING_MEMBER_TIMEOUT);
                let expired: Vec<String> = g
                    .members
                    .iter()
                    .filter(|(_, m)| {
                        m.join.is_none() && now.duration_since(m.last_seen) > m.session_timeout
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for member in expired {
                    info!(group = %id, %member, "group member's session expired");
                    g.remove_member(&member, now, id);
                }
                if g.state == State::PreparingRebalance && g.deadline.is_some_and(|d| now >= d) {
                    g.complete_join(id);
                }
            }
            groups.retain(|_, g| !(g.state == State::Empty && g.pending.is_empty()));
        }
    }

    pub(crate) async fn join(
        &self,
        r: JoinGroupRequest,
        version: i16,
        client_id: String,
        client_host: String,
    ) -> JoinGroupResponse {
        let group_id = r.group_id.to_string();
        if group_id.is_empty() {
            return error_join(ResponseError::InvalidGroupId);
        }
        let session = Duration::from_millis(r.session_timeout_ms.max(0) as u64);
        if session < self.session_bounds.0 || session > self.session_bounds.1 {
            return error_join(ResponseError::InvalidSessionTimeout);
        }
        // v0 has no rebalance timeout: the session timeout is used.
        let rebalance = if version >= 1 {
            Duration::from_millis(r.rebalance_timeout_ms.max(0) as u64)
        } else {
            session
        };
        let protocols: Vec<(String, Bytes)> = r
            .protocols
            .iter()
            .map(|p| (p.name.to_string(), p.metadata.clone()))
            .collect();
        let protocol_type = r.protocol_type.to_string();
        if protocols.is_empty() || protocol_type.is_empty() {
            return error_join(ResponseError::InconsistentGroupProtocol);
        }
        let rx = {
            let now = Instant::now();
            let mut groups = self.lock();
            let g = groups.entry(group_id.clone()).or_insert_with(Group::new);
            if let Some(t) = &g.protocol_type {
                if !g.members.is_empty() && *t != protocol_type {
                    return error_join(ResponseError::InconsistentGroupProtocol);
                }
            }
            if !g.members.is_empty() {
                let shared = g.members.values().all(|m| {
                    m.protocols
                        .iter()
                        .any(|(n, _)| protocols.iter().any(|(p, _)| p == n))
                });
                if !shared {
                    return error_join(ResponseError::InconsistentGroupProtocol);
                }
            }
            let mut member_id = r.member_id.to_string();
            if member_id.is_empty() {
                member_id = format!("{client_id}-{}", uuid::Uuid::new_v4());
                if version >= 4 {
                    // KIP-394: the client rejoins with this id.
                    g.pending.insert(member_id.clone(), now);
                    return JoinGroupResponse::default()
                        .with_error_code(ResponseError::MemberIdRequired.code())
                        .with_generation_id(-1)
                        .with_member_id(str_bytes(member_id));
                }
            } else if !g.members.contains_key(&member_id) && g.pending.remove(&member_id).is_none()
            {
                return error_join(ResponseError::UnknownMemberId)
                    .with_member_id(r.member_id.clone());
            }
            g.protocol_type = Some(protocol_type);
            let (tx, rx) = oneshot::channel();
            let member = g
                .members
                .entry(member_id.clone())
                .or_insert_with(|| Member {
                    client_id: client_id.clone(),
                    client_host: client_host.clone(),
                    protocols: Vec::new(),
                    session_timeout: session,
                    rebalance_timeout: rebalance,
                    last_seen: now,
                    assignment: Bytes::new(),
                    join: None,
                    sync: None,
                });
            member.protocols = protocols;
            member.session_timeout = session;
            member.rebalance_timeout = rebalance;
            member.last_seen = now;
            if let Some((old, _)) = member.join.replace((tx, version)) {
                let _ = old.send(error_join(ResponseError::RebalanceInProgress));
            }
            g.prepare_rebalance(now);
            if g.all_joined() {
                g.complete_join(&group_id);
            }
            rx
        };
        rx.await
            .unwrap_or_else(|_| error_join(ResponseError::CoordinatorNotAvailable))
    }

    pub(crate) async fn sync(&self, r: SyncGroupRequest, version: i16) -> SyncGroupResponse {
        let error = |e: ResponseError| SyncGroupResponse::default().with_error_code(e.code());
        let group_id = r.group_id.to_string();
        let member_id = r.member_id.to_string();
        let rx = {
            let mut groups = self.lock();
            let Some(g) = groups.get_mut(&group_id) else {
                return error(ResponseError::UnknownMemberId);
            };
            if !g.members.contains_key(&member_id) {
                return error(ResponseError::UnknownMemberId);
            }
            if r.generation_id != g.generation {
                return error(ResponseError::IllegalGeneration);
            }
            let protocol = g.protocol.clone();
            let protocol_type = g.protocol_type.clone();
            let answer = |assignment: Bytes| {
                let r = SyncGroupResponse::default().with_assignment(assignment);
                if version >= 5 {
                    r.with_protocol_type(protocol_type.clone().map(str_bytes))
                        .with_protocol_name(protocol.clone().map(str_bytes))
                } else {
                    r
                }
            };
            match g.state {
                State::PreparingRebalance | State::Empty => {
                    return error(ResponseError::RebalanceInProgress)
                }
                State::Stable => {
                    let assignment = g
                        .members
                        .get(&member_id)
                        .map(|m| m.assignment.clone())
                        .unwrap_or_default();
                    return answer(assignment);
                }
                State::CompletingRebalance => {}
            }
            let (tx, rx) = oneshot::channel();
            if let Some(m) = g.members.get_mut(&member_id) {
                m.sync = Some(tx);
                m.last_seen = Instant::now();
            }
            if g.leader.as_deref() == Some(member_id.as_str()) {
                let given: HashMap<String, Bytes> = r
                    .assignments
                    .iter()
                    .map(|a| (a.member_id.to_string(), a.assignment.clone()))
                    .collect();
                for (id, m) in g.members.iter_mut() {
                    m.assignment = given.get(id).cloned().unwrap_or_default();
                    if let Some(tx) = m.sync.take() {
                        let _ = tx.send(answer(m.assignment.clone()));
                    }
                }
                g.state = State::Stable;
            }
            rx
        };
        rx.await
            .unwrap_or_else(|_| error(ResponseError::RebalanceInProgress))
    }

    pub(crate) fn heartbeat(&self, r: &HeartbeatRequest) -> HeartbeatResponse {
        let code = |e: ResponseError| HeartbeatResponse::default().with_error_code(e.code());
        let mut groups = self.lock();
        let Some(g) = groups.get_mut(r.group_id.as_str()) else {
            return code(ResponseError::UnknownMemberId);
        };
        let Some(m) = g.members.get_mut(r.member_id.as_str()) else {
            return code(ResponseError::UnknownMemberId);
        };
        m.last_seen = Instant::now();
        match g.state {
            State::PreparingRebalance => code(ResponseError::RebalanceInProgress),
            _ if r.generation_id != g.generation => code(ResponseError::IllegalGeneration),
            _ => HeartbeatResponse::default(),
        }
    }

    pub(crate) fn leave(&self, r: &LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
        let ids: Vec<String> = if version >= 3 {
            r.members.iter().map(|m| m.member_id.to_string()).collect()
        } else {
            vec![r.member_id.to_string()]
        };
        let now = Instant::now();
        let mut groups = self.lock();
        let group_id = r.group_id.to_string();
        let mut results = Vec::new();
        let mut top = 0;
        match groups.get_mut(&group_id) {
            None => {
                top = ResponseError::UnknownMemberId.code();
                results = ids
                    .iter()
                    .map(|id| (id.clone(), ResponseError::UnknownMemberId.code()))
                    .collect();
            }
            Some(g) => {
                for id in ids {
                    if g.members.contains_key(&id) {
                        info!(group = %group_id, member = %id, "group member left");
                        g.remove_member(&id, now, &group_id);
                        results.push((id, 0));
                    } else {
                        if version < 3 {
                            top = ResponseError::UnknownMemberId.code();
                        }
                        results.push((id, ResponseError::UnknownMemberId.code()));
                    }
                }
            }
        }
        let response = LeaveGroupResponse::default().with_error_code(top);
        if version >= 3 {
            response.with_members(
                results
                    .into_iter()
                    .map(|(id, code)| {
                        MemberResponse::default()
                            .with_member_id(str_bytes(id))
                            .with_error_code(code)
                    })
                    .collect(),
            )
        } else {
            response
        }
    }

    /// Checks that a commit comes from a member of the current generation
    /// (or, with generation -1, from outside any active group).
    fn commit_allowed(&self, r: &OffsetCommitRequest) -> Result<(), ResponseError> {
        let groups = self.lock();
        let Some(g) = groups.get(r.group_id.as_str()) else {
            return if r.generation_id_or_member_epoch < 0 {
                Ok(())
            } else {
                Err(ResponseError::IllegalGeneration)
            };
        };
        if r.generation_id_or_member_epoch < 0 {
            return if g.members.is_empty() {
                Ok(())
            } else {
                Err(ResponseError::UnknownMemberId)
            };
        }
        if !g.members.contains_key(r.member_id.as_str()) {
            return Err(ResponseError::UnknownMemberId);
        }
        if r.generation_id_or_member_epoch != g.generation {
            return Err(ResponseError::IllegalGeneration);
        }
        // As in Kafka: members may commit while a rebalance is being
        // prepared (eager consumers commit as they give partitions up), not
        // while the new generation's assignment is pending.
        match g.state {
            State::CompletingRebalance => Err(ResponseError::RebalanceInProgress),
            _ => Ok(()),
        }
    }

    pub(crate) async fn commit(&self, r: OffsetCommitRequest) -> OffsetCommitResponse {
        let allowed = self.commit_allowed(&r);
        let group = r.group_id.to_string();
        let mut topics = Vec::with_capacity(r.topics.len());
        for t in &r.topics {
            let name = t.name.to_string();
            let partitions = self.log.partition_count(&name);
            let mut offsets = Vec::new();
            let mut answers = Vec::with_capacity(t.partitions.len());
            for p in &t.partitions {
                let code = match (&allowed, partitions) {
                    (Err(e), _) => e.code(),
                    (Ok(()), None) => ResponseError::UnknownTopicOrPartition.code(),
                    (Ok(()), Some(n)) if p.partition_index < 0 || p.partition_index as u32 >= n => {
                        ResponseError::UnknownTopicOrPartition.code()
                    }
                    (Ok(()), Some(_)) if p.committed_offset < 0 => {
                        ResponseError::InvalidCommitOffsetSize.code()
                    }
                    (Ok(()), Some(_)) => {
                        offsets.push((p.partition_index as u32, p.committed_offset as u64));
                        0
                    }
                };
                answers.push((p.partition_index, code));
            }
            if !offsets.is_empty() {
                if let Err(e) = self.log.commit_offsets(&group, &name, offsets).await {
                    warn!(%group, topic = %name, error = %e, "kafka endpoint: offset commit failed");
                    for a in answers.iter_mut().filter(|a| a.1 == 0) {
                        a.1 = ResponseError::CoordinatorNotAvailable.code();
                    }
                }
            }
            topics.push(
                OffsetCommitResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(
                        answers
                            .into_iter()
                            .map(|(i, code)| {
                                OffsetCommitResponsePartition::default()
                                    .with_partition_index(i)
                                    .with_error_code(code)
                            })
                            .collect(),
                    ),
            );
        }
        OffsetCommitResponse::default().with_topics(topics)
    }

    /// Committed offsets of `group`: `wanted` topics (with partitions), or
    /// every topic it committed when `None`.
    fn committed(
        &self,
        group: &str,
        wanted: Option<Vec<(TopicName, Vec<i32>)>>,
    ) -> Vec<(TopicName, Vec<Committed>)> {
        let stored = self.log.group_offsets(group).unwrap_or_default();
        let mut by_topic: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
        for (topic, p, o) in stored {
            by_topic.entry(topic).or_default().insert(p, o);
        }
        match wanted {
            None => by_topic
                .into_iter()
                .map(|(t, ps)| {
                    (
                        TopicName(str_bytes(t)),
                        ps.into_iter()
                            .map(|(p, o)| (p as i32, o as i64, 0))
                            .collect(),
                    )
                })
                .collect(),
            Some(list) => list
                .into_iter()
                .map(|(name, partitions)| {
                    let known = self.log.partition_count(name.as_str());
                    let committed = by_topic.get(name.as_str());
                    let answers = partitions
                        .into_iter()
                        .map(|p| match known {
                            Some(n) if p >= 0 && (p as u32) < n => {
                                let o = committed
                                    .and_then(|c| c.get(&(p as u32)))
                                    .map_or(-1, |o| *o as i64);
                                (p, o, 0)
                            }
                            _ => (p, -1, ResponseError::UnknownTopicOrPartition.code()),
                        })
                        .collect();
                    (name, answers)
                })
                .collect(),
        }
    }

    pub(crate) fn fetch_offsets(
        &self,
        r: &OffsetFetchRequest,
        version: i16,
    ) -> OffsetFetchResponse {
        if version >= 8 {
            let groups = r
                .groups
                .iter()
                .map(|g| {
                    let wanted = g.topics.as_ref().map(|ts| {
                        ts.iter()
                            .map(|t| (t.name.clone(), t.partition_indexes.clone()))
                            .collect()
                    });
                    let topics = self
                        .committed(g.group_id.as_str(), wanted)
                        .into_iter()
                        .map(|(name, ps)| {
                            OffsetFetchResponseTopics::default()
                                .with_name(name)
                                .with_partitions(
                                    ps.into_iter()
                                        .map(|(p, o, code)| {
                                            OffsetFetchResponsePartitions::default()
                                                .with_partition_index(p)
                                                .with_committed_offset(o)
                                                .with_committed_leader_epoch(-1)
                                                .with_metadata(Some(StrBytes::default()))
                                                .with_error_code(code)
                                        })
                                        .collect(),
                                )
                        })
                        .collect();
                    OffsetFetchResponseGroup::default()
                        .with_group_id(g.group_id.clone())
                        .with_topics(topics)
                })
                .collect();
            return OffsetFetchResponse::default().with_groups(groups);
        }
        let wanted = r.topics.as_ref().map(|ts| {
            ts.iter()
                .map(|t| (t.name.clone(), t.partition_indexes.clone()))
                .collect()
        });
        let topics = self
            .committed(r.group_id.as_str(), wanted)
            .into_iter()
            .map(|(name, ps)| {
                OffsetFetchResponseTopic::default()
                    .with_name(name)
                    .with_partitions(
                        ps.into_iter()
                            .map(|(p, o, code)| {
                                let answer = OffsetFetchResponsePartition::default()
                                    .with_partition_index(p)
                                    .with_committed_offset(o)
                                    .with_metadata(Some(StrBytes::default()))
                                    .with_error_code(code);
                                if version >= 5 {
                                    answer.with_committed_leader_epoch(-1)
                                } else {
                                    answer
                                }
                            })
                            .collect(),
                    )
            })
            .collect();
        OffsetFetchResponse::default().with_topics(topics)
    }

    pub(crate) fn describe(&self, r: &DescribeGroupsRequest) -> DescribeGroupsResponse {
        let groups = self.lock();
        let stored = self.log.groups().unwrap_or_default();
        let described = r
            .groups
            .iter()
            .map(|id| {
                let base = DescribedGroup::default().with_group_id(id.clone());
                match groups.get(id.as_str()) {
                    Some(g) => {
                        let protocol = g.protocol.clone().unwrap_or_default();
                        let members = if g.state == State::Stable
                            || g.state == State::CompletingRebalance
                        {
                            g.members
                                .iter()
                                .map(|(mid, m)| {
                                    DescribedGroupMember::default()
                                        .with_member_id(str_bytes(mid.clone()))
                                        .with_client_id(str_bytes(m.client_id.clone()))
                                        .with_client_host(str_bytes(format!("/{}", m.client_host)))
                                        .with_member_metadata(m.metadata(&protocol))
                                        .with_member_assignment(m.assignment.clone())
                                })
                                .collect()
                        } else {
                            Vec::new()
                        };
                        base.with_group_state(str_bytes(g.state.name()))
                            .with_protocol_type(str_bytes(
                                g.protocol_type.clone().unwrap_or_default(),
                            ))
                            .with_protocol_data(str_bytes(protocol))
                            .with_members(members)
                    }
                    None if stored.iter().any(|s| s == id.as_str()) => base
                        .with_group_state(str_bytes("Empty"))
                        .with_protocol_type(str_bytes("consumer")),
                    None => base.with_group_state(str_bytes("Dead")),
                }
            })
            .collect();
        DescribeGroupsResponse::default().with_groups(described)
    }

    pub(crate) fn list(&self, r: &ListGroupsRequest, version: i16) -> ListGroupsResponse {
        let groups = self.lock();
        let mut listed: BTreeMap<String, (String, String)> = BTreeMap::new();
        for id in self.log.groups().unwrap_or_default() {
            listed.insert(id, ("consumer".to_owned(), "Empty".to_owned()));
        }
        for (id, g) in groups.iter() {
            listed.insert(
                id.clone(),
                (
                    g.protocol_type
                        .clone()
                        .unwrap_or_else(|| "consumer".to_owned()),
                    g.state.name().to_owned(),
                ),
            );
        }
        let states: Vec<String> = r.states_filter.iter().map(|s| s.to_lowercase()).collect();
        let types: Vec<String> = r.types_filter.iter().map(|s| s.to_lowercase()).collect();
        let groups = listed
            .into_iter()
            .filter(|(_, (_, state))| states.is_empty() || states.contains(&state.to_lowercase()))
            .filter(|_| types.is_empty() || types.iter().any(|t| t == "classic"))
            .map(|(id, (protocol_type, state))| {
                let g = ListedGroup::default()
                    .with_group_id(GroupId(str_bytes(id)))
                    .with_protocol_type(str_bytes(protocol_type));
                let g = if version >= 4 {
                    g.with_group_state(str_bytes(state))
                } else {
                    g
                };
                if version >= 5 {
                    g.with_group_type(str_bytes("classic"))
                } else {
                    g
                }
            })
            .collect();
        ListGroupsResponse::default().with_groups(groups)
    }
}
