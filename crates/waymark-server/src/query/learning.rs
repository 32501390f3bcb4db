//! The `learning` projection's queries: `GetLearningProgress`,
//! `ListLearningProgress`.

use uuid::Uuid;
use waymark_learning::{CourseState, LearningState, NAME};
use waymark_proto::v1 as pb;

use super::QueryService;
use crate::convert::timestamp;
use crate::error::{parse_person_id, require_id, ApiError};

fn course(person: Uuid, course_id: &str, c: &CourseState) -> pb::LearningProgress {
    pb::LearningProgress {
        person_id: person.to_string(),
        course_id: course_id.to_owned(),
        lessons_completed: c.lessons_completed(),
        average_score: c.average_score(),
        quizzes_answered: c.quizzes_answered,
        quizzes_correct: c.quizzes_correct,
        last_activity: c.last_activity.as_ref().map(timestamp),
    }
}

pub(super) async fn get_learning_progress(
    q: &QueryService,
    r: pb::GetLearningProgressRequest,
) -> Result<pb::LearningProgress, ApiError> {
    let id = parse_person_id(&r.person_id)?;
    require_id("course_id", &r.course_id)?;
    let state: Option<LearningState> = q.projections.state(NAME, id).await?;
    let found = state
        .as_ref()
        .and_then(|s| s.courses.get(&r.course_id))
        .ok_or_else(|| {
            ApiError::NotFound(format!("course {:?} of person {id} not found", r.course_id))
        })?;
    Ok(course(id, &r.course_id, found))
}

pub(super) async fn list_learning_progress(
    q: &QueryService,
    r: pb::ListLearningProgressRequest,
) -> Result<pb::ListLearningProgressResponse, ApiError> {
    let id = parse_person_id(&r.person_id)?;
    let Some(state) = q.projections.state::<LearningState>(NAME, id).await? else {
        q.ensure_known(id).await?;
        return Ok(pb::ListLearningProgressResponse::default());
    };
    Ok(pb::ListLearningProgressResponse {
        courses: state
            .courses
            .iter()
            .map(|(cid, c)| course(id, cid, c))
            .collect(),
    })
}
