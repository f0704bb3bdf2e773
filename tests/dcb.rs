//! Dynamic Consistency Boundaries: an append conditioned on a query is accepted only if no event
//! matching the query was committed after the sequence the decision read, checked inside the
//! commit in global order (events of earlier appends in the same group commit included).

mod common;

use std::sync::Arc;

use common::*;
use pgstore::proto;
use tonic::Code;
use tonic_types::StatusExt;

fn tagged(event_type: &str, tags: &[String]) -> proto::EventData {
    proto::EventData {
        tags: tags.to_vec(),
        ..json_event(event_type, "{}")
    }
}

fn tags(list: &[&str]) -> Vec<String> {
    list.iter().map(|t| t.to_string()).collect()
}

fn query(types: &[&str], tags: &[&str]) -> proto::Query {
    proto::Query {
        items: vec![proto::QueryItem {
            types: types.iter().map(|t| t.to_string()).collect(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }],
    }
}

fn conditional(
    stream: &str,
    e: proto::EventData,
    q: proto::Query,
    after: u64,
) -> proto::AppendRequest {
    proto::AppendRequest {
        condition: Some(proto::AppendCondition {
            fail_if_events_match: Some(q),
            after_sequence: after,
        }),
        ..append(stream, None, vec![e])
    }
}

async fn read(c: &mut Client, q: &proto::Query) -> (Vec<proto::RecordedEvent>, u64) {
    let r = c
        .read(proto::ReadRequest {
            query: Some(q.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (r.events, r.head)
}

#[tokio::test]
async fn a_condition_fails_on_a_matching_event_after_its_sequence_and_writes_nothing() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let name = query(&["NameClaimed"], &["name:ada"]);
    // Nothing matches yet: accepted.
    let (events, head) = read(&mut c, &name).await;
    assert!(events.is_empty());
    let first = c
        .append(conditional(
            "user-1",
            tagged("NameClaimed", &tags(&["name:ada"])),
            name.clone(),
            head,
        ))
        .await
        .unwrap()
        .into_inner();
    // A second claim decided on the same read is refused, naming the first one.
    let err = c
        .append(conditional(
            "user-2",
            tagged("NameClaimed", &tags(&["name:ada"])),
            name.clone(),
            head,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let info = err.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "APPEND_CONDITION_FAILED");
    assert_eq!(
        info.metadata["first_conflicting_sequence"],
        first.last_sequence.to_string()
    );
    // Nothing was written for it.
    let all = read_all(&mut c).await;
    assert_eq!(all.len(), 1);
    // Decided after the first claim: the condition holds for another name, and for the same
    // name only from a read that saw it (then the decision itself must refuse).
    c.append(conditional(
        "user-2",
        tagged("NameClaimed", &tags(&["name:bob"])),
        query(&["NameClaimed"], &["name:bob"]),
        0,
    ))
    .await
    .unwrap();
    // Events of other types or tags do not conflict; after_sequence 0 means the whole log.
    let err = c
        .append(conditional(
            "x",
            json_event("E", "{}"),
            query(&[], &["name:ada"]),
            0,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    c.append(conditional(
        "x",
        json_event("E", "{}"),
        query(&["Other"], &["name:ada"]),
        0,
    ))
    .await
    .unwrap();
    // An empty query matches every event: any event after the sequence fails it.
    let head = read(&mut c, &query(&[], &[])).await.1;
    c.append(conditional(
        "x",
        json_event("E", "{}"),
        proto::Query::default(),
        head,
    ))
    .await
    .unwrap();
    let err = c
        .append(conditional(
            "x",
            json_event("E", "{}"),
            proto::Query::default(),
            head,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A condition and an expected version: both must hold.
    let mut both = conditional(
        "user-3",
        json_event("E", "{}"),
        query(&[], &["name:zed"]),
        0,
    );
    both.expected_version = Some(proto::append_request::ExpectedVersion::Exact(5));
    let err = c.append(both.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "the version check fails: {err}");
    both.expected_version = Some(proto::append_request::ExpectedVersion::NoStream(true));
    c.append(both).await.unwrap();

    // A bad query in a condition is refused.
    let err = c
        .append(conditional(
            "x",
            json_event("E", "{}"),
            query(&[""], &[]),
            0,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// Many appends decided on the same read, sent at once, land in the same group commits: only the
/// first in commit order passes; the others see it although it is not committed yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_in_one_group_commit_see_each_other() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let seat = query(&[], &["seat:1A"]);
    let head = read(&mut c, &seat).await.1;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut c = server.client().await;
        let seat = seat.clone();
        tasks.push(tokio::spawn(async move {
            c.append(conditional(
                &format!("booking-{i}"),
                tagged("SeatBooked", &tags(&["seat:1A"])),
                seat,
                head,
            ))
            .await
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{e}"),
        }
    }
    assert_eq!(accepted, 1);
    assert_eq!(read(&mut c, &seat).await.0.len(), 1);
}

/// The course-subscription example of the DCB model: a course takes at most 3 students, a
/// student at most 2 courses. Many clients decide concurrently (read by query, decide, append
/// with the condition, retry on conflict): no limit is ever exceeded, and every client whose
/// subscription fit gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_decisions_never_over_book() {
    const CAPACITY: usize = 3;
    const STUDENT_LIMIT: usize = 2;
    let server = Arc::new(Server::fresh().await);
    let mut tasks = Vec::new();
    for student in 0..8 {
        for course in 0..3 {
            let server = server.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = server.client().await;
                let (course_tag, student_tag) =
                    (format!("course:{course}"), format!("student:{student}"));
                let decision = proto::Query {
                    items: vec![
                        proto::QueryItem {
                            types: vec!["Subscribed".into()],
                            tags: vec![course_tag.clone()],
                        },
                        proto::QueryItem {
                            types: vec!["Subscribed".into()],
                            tags: vec![student_tag.clone()],
                        },
                    ],
                };
                loop {
                    let (events, head) = read(&mut c, &decision).await;
                    let in_course = events
                        .iter()
                        .filter(|e| e.tags.contains(&course_tag))
                        .count();
                    let of_student = events
                        .iter()
                        .filter(|e| e.tags.contains(&student_tag))
                        .count();
                    if in_course >= CAPACITY || of_student >= STUDENT_LIMIT {
                        return false;
                    }
                    let e = tagged("Subscribed", &[course_tag.clone(), student_tag.clone()]);
                    match c
                        .append(conditional(
                            &format!("s-{student}-{course}"),
                            e,
                            decision.clone(),
                            head,
                        ))
                        .await
                    {
                        Ok(_) => return true,
                        Err(e) if e.code() == Code::FailedPrecondition => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
    }
    let mut subscribed = 0;
    for t in tasks {
        subscribed += usize::from(t.await.unwrap());
    }
    let mut c = server.client().await;
    let all = read(&mut c, &query(&["Subscribed"], &[])).await.0;
    assert_eq!(all.len(), subscribed);
    for course in 0..3 {
        let n = all
            .iter()
            .filter(|e| e.tags.contains(&format!("course:{course}")))
            .count();
        assert_eq!(n, CAPACITY, "course {course} is full, never over");
    }
    for student in 0..8 {
        let n = all
            .iter()
            .filter(|e| e.tags.contains(&format!("student:{student}")))
            .count();
        assert!(n <= STUDENT_LIMIT, "student {student} has {n} courses");
    }
}

/// Two instances on one database decide on the same tag: each writer remembers only its own
/// events, and the commit's proof of the head makes a decision that missed the other instance's
/// event go through the database. Many rounds, one winner each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_side_by_side_never_both_win() {
    let url = fresh_db().await;
    let (a, b) = (Server::fresh_on(&url).await, Server::fresh_on(&url).await);
    let mut reader = a.client().await;
    for round in 0..20 {
        let seat = query(&[], &[&format!("seat:{round}")]);
        let head = read(&mut reader, &seat).await.1;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let mut c = if i % 2 == 0 {
                a.client().await
            } else {
                b.client().await
            };
            let seat = seat.clone();
            tasks.push(tokio::spawn(async move {
                c.append(conditional(
                    &format!("r{round}-{i}"),
                    tagged("SeatBooked", &tags(&[&format!("seat:{round}")])),
                    seat,
                    head,
                ))
                .await
                .is_ok()
            }));
        }
        let mut won = 0;
        for t in tasks {
            won += usize::from(t.await.unwrap());
        }
        assert_eq!(won, 1, "round {round}");
    }
}

#[tokio::test]
async fn a_dcb_append_without_a_stream_goes_to_the_default_stream() {
    let server = Server::fresh().await;
    let mut c = server.client().await;
    let seat = query(&[], &["seat:9"]);
    // Tagged events alone, then a conditional append: neither names a stream.
    let first = c
        .append(append(
            "",
            None,
            vec![tagged("SeatBooked", &tags(&["seat:9"]))],
        ))
        .await
        .unwrap()
        .into_inner();
    let err = c
        .append(conditional(
            "",
            tagged("SeatBooked", &tags(&["seat:9"])),
            seat.clone(),
            0,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let second = c
        .append(conditional(
            "",
            json_event("Noted", "{}"),
            seat,
            first.last_sequence,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.version, 2, "both in one stream");
    let (events, _) = read(&mut c, &proto::Query::default()).await;
    assert!(events.iter().all(|e| e.stream_id == "$dcb"), "{events:?}");
    assert_eq!(events.len(), 2);
    // Without a condition or tags, a stream is still required.
    let err = c
        .append(append("", None, vec![json_event("E", "{}")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
